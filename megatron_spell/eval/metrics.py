"""Evaluation metrics: mean@n and the unbiased pass@k, per benchmark and overall (spec section 8.3).

* `mean@n` of one question is the mean of its n per-sample final scores (the paper's "pass@1").
* `pass@k` is the **unbiased combinatorial estimator** 1 - C(n-c, k) / C(n, k) for a question with c correct
  samples out of n (Chen et al. 2021), in its numerically stable product form
  1 - prod_{i=n-c+1}^{n} (1 - k / i). It is the probability that at least one of k samples drawn without
  replacement from the n is correct.
* For scores that are not 0/1, `best_of_k` gives the unbiased expected maximum of k samples drawn without
  replacement, sum_j s_(j) C(j-1, k-1) / C(n, k) over the ascending-sorted scores; for 0/1 scores it equals
  `pass_at_k` exactly (tested), so the report uses it for every question.
* A benchmark's value is the mean over its questions. Two overall values are reported and labelled:
  `overall (macro)` = the unweighted mean over benchmarks (the reference code's "overall", spec 8.3) and
  `overall (micro)` = the mean over all questions pooled.

Deliberate deviation: the reference's pass@k is a seeded bootstrap with replacement ("best@k", spec 8.3), whose
expectation is about 1 - (1 - p)^k and which is biased low; we use the unbiased estimator the issue asks for.
Questions with fewer than k samples have no pass@k (k is limited to the smallest n in the group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MACRO = "overall (macro)"
MICRO = "overall (micro)"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}"
        )
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def best_of_k(scores: Sequence[float], k: int) -> float:
    """Unbiased E[max of k samples drawn without replacement from `scores`]; equals pass@k for 0/1 scores."""
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"best_of_k needs 1 <= k <= len(scores); got k={k}, n={n}")
    if all(s in (0.0, 1.0) for s in scores):
        return pass_at_k(n, int(sum(scores)), k)
    return expected_max_at_k(scores, k)


def expected_max_at_k(scores: Sequence[float], k: int) -> float:
    """E[max of k of `scores` drawn without replacement], from the sorted scores and binomial weights."""
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"expected_max_at_k needs 1 <= k <= len(scores); got k={k}, n={n}")
    ordered = sorted(float(s) for s in scores)
    total = math.comb(n, k)
    # The j-th smallest (1-based) is the max of exactly C(j-1, k-1) of the C(n, k) subsets.
    return sum(s * math.comb(j - 1, k - 1) for j, s in enumerate(ordered, 1) if j >= k) / total


def default_ks(n: int) -> tuple[int, ...]:
    """Powers of two up to n, plus n itself: (1, 2, 4, 8) for n = 8."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n:
        ks.append(n)
    return tuple(ks)


@dataclass(frozen=True)
class GroupMetrics:
    """Aggregates over one group of questions (a benchmark or overall). Values are fractions in [0, 1]."""

    name: str
    num_examples: int
    num_samples: int
    mean_at_n: float
    pass_at: dict[int, float]


def question_metrics(scores: Sequence[float], ks: Iterable[int]) -> tuple[float, dict[int, float]]:
    """mean@n and pass@k (for every k <= n) of one question's per-sample scores."""
    if not scores:
        raise ValueError("a question needs at least one sample score")
    mean = sum(scores) / len(scores)
    return mean, {k: best_of_k(scores, k) for k in ks if k <= len(scores)}


def aggregate(
    per_question: Sequence[tuple[str, Sequence[float]]], ks: Sequence[int]
) -> list[GroupMetrics]:
    """Per-benchmark metrics plus the macro and micro overall rows.

    `per_question` holds (benchmark, per-sample scores) per question. Benchmarks keep first-seen order.
    """
    by_bench: dict[str, list[tuple[float, dict[int, float]]]] = {}
    samples: dict[str, int] = {}
    for bench, scores in per_question:
        by_bench.setdefault(bench, []).append(question_metrics(scores, ks))
        samples[bench] = samples.get(bench, 0) + len(scores)
    rows = []
    for bench, items in by_bench.items():
        rows.append(_mean_group(bench, items, samples[bench]))
    if not rows:
        return rows
    common = [k for k in ks if all(k in row.pass_at for row in rows)]
    rows.append(
        GroupMetrics(
            name=MACRO,
            num_examples=sum(r.num_examples for r in rows),
            num_samples=sum(r.num_samples for r in rows),
            mean_at_n=sum(r.mean_at_n for r in rows) / len(rows),
            pass_at={k: sum(r.pass_at[k] for r in rows) / len(rows) for k in common},
        )
    )
    pooled = [item for items in by_bench.values() for item in items]
    rows.append(_mean_group(MICRO, pooled, sum(samples.values())))
    return rows


def _mean_group(
    name: str, items: list[tuple[float, dict[int, float]]], num_samples: int
) -> GroupMetrics:
    ks = [k for k in items[0][1] if all(k in p for _, p in items)]
    return GroupMetrics(
        name=name,
        num_examples=len(items),
        num_samples=num_samples,
        mean_at_n=sum(m for m, _ in items) / len(items),
        pass_at={k: sum(p[k] for _, p in items) / len(items) for k in ks},
    )
