"""Eq. 6 and Eq. 7 golden values (docs/spell-algorithm.md §3.3 and §3.5)."""

import math

import pytest

from megatron_spell.spell.rewards import (
    BAD_CASE_REWARDS,
    bad_case_reward,
    questioner_reward,
    responder_reward,
)
from megatron_spell.types import CaseType

# The table at x = k/8, k = 1..7 (docs/spell-algorithm.md §3.5).
GAUSSIAN = [0.0796, 0.3247, 0.7548, 1.0, 0.7548, 0.3247, 0.0796]
REVERSE = [0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
RZERO = [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize(
    ("mapping", "table"), [("gaussian", GAUSSIAN), ("reverse", REVERSE), ("rzero", RZERO)]
)
def test_eq7_table(mapping, table):
    got = [questioner_reward(k / 8, mapping) for k in range(1, 8)]
    assert got == pytest.approx(table, abs=5e-5)


def test_gaussian_is_exp_minus_18_squared():
    for x in (0.1, 0.33, 0.61, 0.97):
        assert questioner_reward(x) == pytest.approx(math.exp(-18 * (x - 0.5) ** 2), rel=1e-12)


@pytest.mark.parametrize("mapping", ["gaussian", "reverse", "rzero"])
def test_edges_zero_and_one(mapping):
    assert questioner_reward(0.0, mapping) == 0.0
    assert questioner_reward(-0.5, mapping) == -0.5  # x <= 0 is returned unchanged
    assert questioner_reward(1.0, mapping) == 0.0  # "too easy" gets nothing
    assert questioner_reward(1.5, mapping) == 0.0


def test_unknown_mapping_and_nan_raise():
    with pytest.raises(ValueError, match="mapping"):
        questioner_reward(0.5, "linear")
    with pytest.raises(ValueError, match="NaN"):
        questioner_reward(float("nan"))


def test_bad_case_values():
    assert BAD_CASE_REWARDS == {
        CaseType.BAD_FORMAT: -1.0,
        CaseType.BAD_GROUND: -0.5,
        CaseType.ZERO_VARIANCE: 0.0,
    }
    with pytest.raises(ValueError, match="dropped"):
        bad_case_reward(CaseType.DROPPED)


@pytest.mark.parametrize(
    ("rule", "vote", "combine", "expected"),
    [
        (0.0, 1, "max", 1.0),  # the verifier upgrades (docs/spell-algorithm.md §9 item 5)
        (1.0, 0, "max", 1.0),  # ... but never downgrades under max
        (1.0, 0, "min", 0.0),
        (1.0, 0, "mean", 0.5),
        (1.0, 1, "sum", 2.0),
        (0.0, -1, "max", 0.0),  # invalid majority: the rule score
        (1.0, -100, "min", 1.0),  # not judged: the rule score
        (0.0, 1, "rule", 0.0),  # "rule" ignores the verifier
    ],
)
def test_responder_reward(rule, vote, combine, expected):
    """Eq. 6; docs/spell-algorithm.md §9 item 5: max (the default, kept for parity) lets the
    verifier only upgrade."""
    assert responder_reward(rule, vote, combine) == expected


def test_responder_reward_unknown_combine():
    with pytest.raises(ValueError, match="reward_combine"):
        responder_reward(1.0, 1, "avg")
