"""Verifier votes, majority tie rule, rewards and candidate selection (docs/spell-algorithm.md §3.2,
§3.4; D3 and §9 item 4)."""

import pytest

from megatron_spell.spell.verifier import (
    INVALID,
    NO,
    YES,
    agreement_ratio,
    is_training_candidate,
    judgement_rewards,
    majority,
    parse_vote,
)


@pytest.mark.parametrize(
    ("text", "vote"),
    [
        ("They match. [[YES]]", YES),
        ("They differ. [[NO]]", NO),
        ("[[ yes ]]", YES),
        # docs/spell-algorithm.md D3: capitalised words containing NO are not a NO
        ("NOTE: NONE of the units differ, NOT a problem. [[YES]]", YES),
        ("NOTE: the numbers agree. YES", YES),
        ("I cannot tell.", INVALID),
        ("YES and NO", INVALID),
        ("Earlier I thought [[NO]], but final decision: [[YES]]", YES),  # the last decision wins
        ("<think>hmm [[YES]]", INVALID),  # unclosed thinking
        ("<think>[[NO]]</think> [[YES]]", YES),  # only the text after </think>
        ("YESTERDAY it was NOTED", INVALID),
    ],
)
def test_parse_vote(text, vote):
    assert parse_vote(text) == vote


def test_reference_substring_bug_is_fixed():
    """The reference scores this as invalid (-1) because "NOT" contains "NO"."""
    assert parse_vote("The answers are NOT different. YES") == YES


def test_majority_and_tie_rule():
    assert majority([1, 1, 0, -1]) == YES
    assert majority([0, 0, 0, 1, 1, -1, -1]) == NO
    assert majority([-1, -1, -1, 1]) == INVALID  # invalid can be the strict mode
    # a YES/NO tie for the top count is "no majority", independent of vote order
    assert majority([1, 1, 0, 0]) == INVALID
    assert majority([0, 0, 1, 1]) == INVALID
    assert majority([1, 1, 0, 0, -1, -1]) == INVALID
    # a tie between one valid value and the invalid votes goes to the valid value, in any order
    assert majority([0, 0, 0, 1, 1, -1, -1, -1]) == NO
    assert majority([-1, -1, -1, 0, 0, 0, 1, 1]) == NO
    assert majority([1, -1]) == YES and majority([-1, 1]) == YES
    assert majority([]) == INVALID


@pytest.mark.parametrize("order", [[1, 1, 1, -1, -1, -1, 0, 0], [-1, 0, -1, 1, 0, -1, 1, 1]])
def test_tie_with_invalid_votes_keeps_the_valid_majority(order):
    """The documented rule on the review's example: majority 1, agreement 3/5, a training candidate
    when the rule score is 1 (what the reference gives when a YES comes first), in any vote order."""
    assert majority(order) == YES
    assert agreement_ratio(order, YES) == pytest.approx(0.6)
    assert is_training_candidate(order, rule_score=1.0)
    assert not is_training_candidate(order, rule_score=0.0)  # maj_cons
    assert judgement_rewards(order, YES).count(1.0) == 3


def test_yes_no_tie_fails_the_agreement_bound():
    """The docstring's claim: a YES/NO tie has agreement 0.5 over valid votes, below 0.51."""
    votes = [1, 1, 0, 0, -1]
    assert majority(votes) == INVALID
    assert agreement_ratio(votes, YES) == pytest.approx(0.5)


def test_judgement_rewards():
    assert judgement_rewards([1, 1, 0, -1], YES) == [1.0, 1.0, 0.0, -1.0]
    assert judgement_rewards([0, 1], NO) == [1.0, 0.0]


def test_agreement_ratio():
    assert agreement_ratio([1, 1, 1, 0, -1], YES) == pytest.approx(0.75)
    assert agreement_ratio([0, 0, 1, -1], NO) == pytest.approx(2 / 3)
    assert agreement_ratio([-1, -1], INVALID) == 0.0


def test_candidate_selection_maj_cons_and_bounds():
    """docs/spell-algorithm.md §9 item 4: maj_cons (default) keeps only groups agreeing with the
    rule score; maj drops it."""
    votes = [1] * 6 + [0] * 2  # agreement 0.75
    assert is_training_candidate(votes, rule_score=1.0)
    # maj_cons: majority must agree with the rule score (docs/spell-algorithm.md §9 item 4) ...
    assert not is_training_candidate(votes, rule_score=0.0)
    # ... maj drops that condition
    assert is_training_candidate(votes, rule_score=0.0, label_type="maj")
    assert not is_training_candidate([1] * 8, rule_score=1.0)  # unanimous: 1.0 > 0.99
    assert not is_training_candidate([1] * 4 + [0] * 4, rule_score=1.0)  # tie
    assert not is_training_candidate([-1] * 8, rule_score=0.0)
    assert is_training_candidate([1] * 8, rule_score=1.0, upper_bound=1.0)
    with pytest.raises(ValueError, match="label_type"):
        is_training_candidate(votes, 1.0, label_type="mean")
    with pytest.raises(ValueError, match="bounds"):
        is_training_candidate(votes, 1.0, lower_bound=0.9, upper_bound=0.5)
