"""pass@k, best-of-k and aggregation against hand-computed values and brute-force subset enumeration."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spell.eval.metrics import (
    LB_MQA,
    MACRO,
    MICRO,
    PAPER_AVG,
    aggregate,
    best_of_k,
    default_ks,
    expected_max_at_k,
    pass_at_k,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (8, 0, 1, 0.0),
        (8, 0, 8, 0.0),
        (8, 8, 1, 1.0),
        (8, 1, 1, 1 / 8),
        (8, 1, 2, 1 - 21 / 28),  # 1 - C(7,2)/C(8,2)
        (8, 2, 2, 13 / 28),  # 1 - C(6,2)/C(8,2) = 1 - 15/28
        (8, 2, 4, 11 / 14),  # 1 - C(6,4)/C(8,4) = 1 - 15/70
        (8, 4, 4, 69 / 70),  # 1 - C(4,4)/C(8,4)
        (8, 5, 4, 1.0),  # n - c < k: every 4-subset holds a correct sample
        (8, 1, 8, 1.0),
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3)
        (10, 3, 1, 0.3),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def _brute_pass(n: int, c: int, k: int) -> Fraction:
    correct = set(range(c))
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if correct.intersection(s))
    return Fraction(hits, len(subsets))


def test_pass_at_k_matches_subset_enumeration_exhaustively() -> None:
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n() -> None:
    # Exact rational reference from integer binomials: the product form must not lose precision.
    for n, c, k in [(200, 3, 100), (1000, 1, 1), (1000, 7, 500), (500, 0, 250), (300, 299, 2)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_the_mean() -> None:
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_invalid(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=7),
    st.integers(min_value=1, max_value=7),
)
def test_expected_max_matches_subset_enumeration(scores: list[float], k: int) -> None:
    k = min(k, len(scores))
    subsets = list(itertools.combinations(scores, k))
    brute = sum(max(s) for s in subsets) / len(subsets)
    assert expected_max_at_k(scores, k) == pytest.approx(brute, abs=1e-12)
    assert best_of_k(scores, k) == pytest.approx(brute, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=9), st.integers(1, 9))
def test_expected_max_equals_pass_at_k_for_binary_scores(scores: list[float], k: int) -> None:
    k = min(k, len(scores))
    assert expected_max_at_k(scores, k) == pytest.approx(
        pass_at_k(len(scores), int(sum(scores)), k), abs=1e-12
    )


def test_default_ks() -> None:
    assert default_ks(8) == (1, 2, 4, 8)
    assert default_ks(1) == (1,)
    assert default_ks(6) == (1, 2, 4, 6)


def test_aggregate_per_benchmark_macro_and_micro() -> None:
    per_question = [
        ("a", [1.0, 0.0, 0.0, 0.0]),  # mean 0.25, pass@2 = 1 - C(3,2)/C(4,2) = 0.5
        ("a", [1.0, 1.0, 1.0, 1.0]),  # mean 1, pass@2 = 1
        ("b", [0.0, 0.0, 0.0, 0.0]),  # mean 0, pass@2 = 0
    ]
    rows = {r.name: r for r in aggregate(per_question, ks=(1, 2, 4))}
    assert list(rows) == ["a", "b", MACRO, MICRO]
    assert rows["a"].num_examples == 2 and rows["a"].num_samples == 8
    assert rows["a"].mean_at_n == pytest.approx(0.625)
    assert rows["a"].pass_at == pytest.approx({1: 0.625, 2: 0.75, 4: 1.0})
    assert rows["b"].pass_at == pytest.approx({1: 0.0, 2: 0.0, 4: 0.0})
    # macro: unweighted over benchmarks; micro: over the 3 questions
    assert rows[MACRO].mean_at_n == pytest.approx((0.625 + 0.0) / 2)
    assert rows[MACRO].pass_at[2] == pytest.approx((0.75 + 0.0) / 2)
    assert rows[MICRO].mean_at_n == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert rows[MICRO].pass_at[2] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert rows[MICRO].num_examples == 3


def test_standard_errors_hand_computed() -> None:
    per_question = [
        ("a", [1.0, 0.0, 0.0, 0.0]),  # mean 0.25, pass@2 0.5
        ("a", [1.0, 1.0, 1.0, 1.0]),  # mean 1, pass@2 1
        ("b", [0.0, 0.0, 0.0, 0.0]),
    ]
    rows = {r.name: r for r in aggregate(per_question, ks=(1, 2))}
    # two questions: std (n - 1) of (0.25, 1) is 0.75 / sqrt(2); over sqrt(2) gives 0.375
    assert rows["a"].mean_se == pytest.approx(0.375)
    assert rows["a"].pass_se[2] == pytest.approx(0.25)  # (0.5, 1): 0.5 / sqrt(2) / sqrt(2)
    assert rows["b"].mean_se == 0.0  # one question
    assert rows[MACRO].mean_se == pytest.approx(math.sqrt(0.375**2 + 0.0) / 2)
    three = [0.25, 1.0, 0.0]
    mu = sum(three) / 3
    want = math.sqrt(sum((v - mu) ** 2 for v in three) / 2 / 3)
    assert rows[MICRO].mean_se == pytest.approx(want)


def test_aggregate_drops_k_above_n() -> None:
    rows = aggregate([("a", [1.0, 0.0])], ks=(1, 2, 4))
    assert set(rows[0].pass_at) == {1, 2}


def test_paper_columns_lb_mqa_and_avg() -> None:
    per_question = [
        ("hotpotqa", [1.0, 0.0]),  # 0.5
        ("musique", [1.0, 1.0]),  # 1.0
        ("docmath", [0.0, 0.0]),  # 0.0
        ("longbench-v2", [1.0, 0.0]),  # 0.5
    ]
    rows = {r.name: r for r in aggregate(per_question, ks=(1, 2))}
    assert list(rows) == [
        "hotpotqa", "musique", "docmath", "longbench-v2", LB_MQA, PAPER_AVG, MACRO, MICRO,
    ]  # fmt: skip
    assert rows[LB_MQA].mean_at_n == pytest.approx(0.75)  # mean of hotpotqa and musique
    assert rows[LB_MQA].num_examples == 2
    # paper Avg: docmath, LB-MQA, longbench-v2 (frames absent): (0 + 0.75 + 0.5) / 3
    assert rows[PAPER_AVG].mean_at_n == pytest.approx(1.25 / 3)
    assert rows[PAPER_AVG].pass_at[2] == pytest.approx((0.0 + 1.0 + 1.0) / 3)
    # macro is over the four benchmarks only, not the derived rows
    assert rows[MACRO].mean_at_n == pytest.approx(0.5)
    assert rows[MACRO].num_examples == 4
