"""Evaluation metrics: mean@n and the unbiased pass@k, per benchmark and overall
(docs/spell-algorithm.md §8.3).

* `mean@n` of one question is the mean of its n per-sample final scores (the paper's "pass@1").
* `pass@k` is the **unbiased combinatorial estimator** 1 - C(n-c, k) / C(n, k) for a question with c correct
  samples out of n (Chen et al. 2021), in its numerically stable product form
  1 - prod_{i=n-c+1}^{n} (1 - k / i). It is the probability that at least one of k samples drawn without
  replacement from the n is correct.
* For scores that are not 0/1, `best_of_k` gives the unbiased expected maximum of k samples drawn without
  replacement, sum_j s_(j) C(j-1, k-1) / C(n, k) over the ascending-sorted scores; for 0/1 scores it equals
  `pass_at_k` exactly (tested), so the report uses it for every question.
* A benchmark's value is the mean over its questions, with its standard error over questions
  (sample standard deviation of the per-question values / sqrt(questions); 0 for one question). A mean of
  groups (macro, the paper's columns) takes sqrt(sum of squared SEs) / groups (independent groups).
  Two overall values are reported and labelled:
  `overall (macro)` = the unweighted mean over benchmarks (the reference code's "overall", §8.3) and
  `overall (micro)` = the mean over all questions pooled.
* The paper's own columns (§8.1) are added when their benchmarks are present: `LB-MQA (paper)` = the mean
  of 2wikimqa, hotpotqa and musique, and `Avg (paper)` = the mean of docmath, frames, LB-MQA and
  longbench-v2 (the headline "Avg." of the paper's table).

Deliberate deviation: the reference's pass@k is a seeded bootstrap with replacement ("best@k", §8.3), whose
expectation is about 1 - (1 - p)^k and which is biased low; we use the unbiased estimator.
Questions with fewer than k samples have no pass@k (k is limited to the smallest n in the group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MACRO = "overall (macro)"
MICRO = "overall (micro)"
LB_MQA = "LB-MQA (paper)"
PAPER_AVG = "Avg (paper)"
MQA_BENCHMARKS = ("2wikimqa", "hotpotqa", "musique")


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
    # standard errors over questions of mean_at_n and of each pass@k
    mean_se: float = 0.0
    pass_se: dict[int, float] = field(default_factory=dict)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values` (sample std with n - 1, over sqrt(n)); 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def question_metrics(scores: Sequence[float], ks: Iterable[int]) -> tuple[float, dict[int, float]]:
    """mean@n and pass@k (for every k <= n) of one question's per-sample scores."""
    if not scores:
        raise ValueError("a question needs at least one sample score")
    mean = sum(scores) / len(scores)
    return mean, {k: best_of_k(scores, k) for k in ks if k <= len(scores)}


def _mean_of_groups(name: str, rows: Sequence[GroupMetrics]) -> GroupMetrics:
    """Unweighted mean over groups (each group counts once, whatever its number of questions)."""
    common = [k for k in rows[0].pass_at if all(k in row.pass_at for row in rows)]
    return GroupMetrics(
        name=name,
        num_examples=sum(r.num_examples for r in rows),
        num_samples=sum(r.num_samples for r in rows),
        mean_at_n=sum(r.mean_at_n for r in rows) / len(rows),
        pass_at={k: sum(r.pass_at[k] for r in rows) / len(rows) for k in common},
        mean_se=math.sqrt(sum(r.mean_se**2 for r in rows)) / len(rows),
        pass_se={
            k: math.sqrt(sum(r.pass_se.get(k, 0.0) ** 2 for r in rows)) / len(rows) for k in common
        },
    )


def paper_rows(rows: Sequence[GroupMetrics]) -> list[GroupMetrics]:
    """The paper's derived columns (docs/spell-algorithm.md §8.1), from whichever of their
    benchmarks are present.

    `LB_MQA` = mean of 2wikimqa, hotpotqa, musique; `PAPER_AVG` = mean of docmath, frames, LB-MQA and
    longbench-v2. Both are unweighted means over the present benchmarks; absent ones are left out (say so
    when comparing with the paper).
    """
    by_name = {r.name: r for r in rows}
    out = []
    mqa = [by_name[b] for b in MQA_BENCHMARKS if b in by_name]
    if mqa:
        out.append(_mean_of_groups(LB_MQA, mqa))
    columns = [by_name.get("docmath"), by_name.get("frames"), out[0] if mqa else None]
    columns.append(by_name.get("longbench-v2"))
    present = [c for c in columns if c is not None]
    if present:
        out.append(_mean_of_groups(PAPER_AVG, present))
    return out


def aggregate(
    per_question: Sequence[tuple[str, Sequence[float]]], ks: Sequence[int]
) -> list[GroupMetrics]:
    """Per-benchmark rows, the paper's derived rows (when their benchmarks are present), macro and micro.

    `per_question` holds (benchmark, per-sample scores) per question. Benchmarks keep first-seen order. The
    macro row averages the benchmark rows only (not the derived ones).
    """
    by_bench: dict[str, list[tuple[float, dict[int, float]]]] = {}
    samples: dict[str, int] = {}
    for bench, scores in per_question:
        by_bench.setdefault(bench, []).append(question_metrics(scores, ks))
        samples[bench] = samples.get(bench, 0) + len(scores)
    rows = [_mean_group(bench, items, samples[bench]) for bench, items in by_bench.items()]
    if not rows:
        return rows
    pooled = [item for items in by_bench.values() for item in items]
    return [
        *rows,
        *paper_rows(rows),
        _mean_of_groups(MACRO, rows),
        _mean_group(MICRO, pooled, sum(samples.values())),
    ]


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
        mean_se=standard_error([m for m, _ in items]),
        pass_se={k: standard_error([p[k] for _, p in items]) for k in ks},
    )
