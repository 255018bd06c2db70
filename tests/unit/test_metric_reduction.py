"""Metrics that carry their reduction: Sum adds, Mean adds totals and counts, whatever the key is called."""

import pytest

from megatron_spell.metrics import Mean, Sum, merge_metrics, values


def test_sum_and_mean_merge_by_their_own_reduction():
    parts = [
        {"a/num_x": Sum(2), "a/frac": Mean(1, 4), "a/only_here": Mean(3, 3)},
        {"a/num_x": Sum(5), "a/frac": Mean(3, 4)},
        {},
    ]
    merged = merge_metrics(parts)
    assert merged == {"a/num_x": Sum(7), "a/frac": Mean(4, 8), "a/only_here": Mean(3, 3)}
    assert values(merged) == {"a/num_x": 7.0, "a/frac": 0.5, "a/only_here": 1.0}


def test_mean_of_values_and_of_nothing():
    assert Mean.of([1.0, 0.0, 0.5]).value == pytest.approx(0.5)
    assert Mean.of([]).value == 0.0 and Mean(0, 0).value == 0.0
    # a part with no count adds nothing: (1 + 0) / (2 + 0)
    assert Mean(1, 2).merge(Mean(0, 0)).value == 0.5
    # the name does not choose the reduction: a "num_" key can be a mean, a "_frac" key a sum
    merged = merge_metrics([{"num_frac": Mean(1, 1)}, {"num_frac": Mean(0, 3)}])
    assert float(merged["num_frac"]) == 0.25


def test_one_key_with_two_reductions_is_an_error():
    with pytest.raises(TypeError, match="metric q/x: parts reduce by Sum and Mean"):
        merge_metrics([{"q/x": Sum(1)}, {"q/x": Mean(1, 2)}])
