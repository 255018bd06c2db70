"""Responder reward (Eq. 6, docs/spell-algorithm.md §3.3), questioner reward (Eq. 7, §3.5) and the
bad-case values.

* `responder_reward(rule, majority, combine="max")`: when the verifier majority is valid (0 or 1) the rule
  score and the majority are combined (max by default as in the reference; mean, min, sum available); an invalid
  or missing majority leaves the rule score. §9 item 5: max lets the verifier only upgrade rewards (a
  false-positive risk); we keep it as the default for parity and expose the alternatives.
* `questioner_reward(x, mapping)`: x is the mean combined responder reward of the question's group. Values
  x <= 0 are returned unchanged, x == 1 gives 0, otherwise gaussian exp(-(x-0.5)^2 / (2 sigma^2)) with
  sigma = 1/6, reverse 1 - x, or rzero 1 - 2|x - 0.5|. Values above 1 are treated like 1 (no reward): a mean of
  binary rewards cannot exceed 1, and a "sum" combine is the caller's choice.
* Bad cases: bad_format -1, bad_ground -0.5, zero_variance 0 (`BAD_CASE_REWARDS`).
"""

from __future__ import annotations

import math

from megatron_spell.types import CaseType

GAUSSIAN_SIGMA = 1.0 / 6.0
MAPPINGS = ("gaussian", "reverse", "rzero")
COMBINES = ("max", "mean", "min", "sum", "rule")
BAD_CASE_REWARDS: dict[CaseType, float] = {
    CaseType.BAD_FORMAT: -1.0,
    CaseType.BAD_GROUND: -0.5,
    CaseType.ZERO_VARIANCE: 0.0,
}


def responder_reward(rule_score: float, majority_vote: int, combine: str = "max") -> float:
    """Eq. 6: combine the rule score with a valid verifier majority (0 or 1); else the rule score."""
    if combine not in COMBINES:
        raise ValueError(f"reward_combine={combine!r}: expected one of {COMBINES}")
    if majority_vote not in (0, 1) or combine == "rule":
        return float(rule_score)
    v = float(majority_vote)
    if combine == "max":
        return max(rule_score, v)
    if combine == "min":
        return min(rule_score, v)
    if combine == "mean":
        return (rule_score + v) / 2.0
    return rule_score + v


def questioner_reward(success_rate: float, mapping: str = "gaussian") -> float:
    """Eq. 7 mapping of a good question's responder success rate (module docstring)."""
    if mapping not in MAPPINGS:
        raise ValueError(f"questioner reward mapping={mapping!r}: expected one of {MAPPINGS}")
    x = float(success_rate)
    if math.isnan(x):
        raise ValueError("questioner success_rate is NaN")
    if x <= 0.0:
        return x
    if x >= 1.0:
        return 0.0
    if mapping == "gaussian":
        return math.exp(-((x - 0.5) ** 2) / (2.0 * GAUSSIAN_SIGMA**2))
    if mapping == "reverse":
        return 1.0 - x
    return 1.0 - 2.0 * abs(x - 0.5)


def bad_case_reward(case: CaseType) -> float:
    """Raw questioner reward of a bad case; DROPPED samples are never trained on and have no reward."""
    if case not in BAD_CASE_REWARDS:
        raise ValueError(
            f"case {case!r} has no questioner reward; dropped samples are not trained on"
        )
    return BAD_CASE_REWARDS[case]
