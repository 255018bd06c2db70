"""Rule-based scorers (docs/spell-algorithm.md §3.1) and the D4 decisions (no eval, sign-aware
comparison)."""

import pytest

from megatron_spell.spell import scorers
from megatron_spell.spell.scorers import (
    compare_two_numbers,
    normalize_answer,
    parse_number,
    parse_prediction,
    qa_metrics,
    score,
)
from megatron_spell.types import Task


class TestGeneralQA:
    def test_normalize(self):
        assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
        assert normalize_answer("An apple a day") == "apple day"

    def test_metrics_table(self):
        m = qa_metrics("the city of Paris", "Paris")
        assert m == {
            "em": 0.0,
            "sub_em_strict": 1.0,
            "sub_em_loose": 1.0,
            "half_em": 0.5,
            "f1": 0.5,
        }
        m = qa_metrics("Paris", "Paris, France")
        assert (m["sub_em_strict"], m["sub_em_loose"], m["f1"]) == (0.0, 1.0, 0.67)
        assert qa_metrics("yes", "no")["f1"] == 0.0
        assert qa_metrics("", "x")["sub_em_loose"] == 0.0

    def test_default_metric_is_sub_em_strict(self):
        pred = "Reasoning...\nThe correct answer is Paris, the capital.\nMore text"
        assert score(Task.DOC_GENERAL_QA, pred, "Paris") == 1.0
        assert score(Task.DOC_GENERAL_QA, "The correct answer is Paris", "Paris, France") == 0.0
        loose = score(
            "doc_general_qa",
            "The correct answer is Paris",
            "Paris, France",
            qa_metric="sub_em_loose",
        )
        assert loose == 1.0

    def test_extraction_rules(self):
        assert parse_prediction(Task.DOC_GENERAL_QA, "<think>The answer is X") is None  # unclosed
        assert (
            parse_prediction(Task.DOC_GENERAL_QA, "<think>a</think>The answer is **Rome**.")
            == "Rome"
        )
        assert parse_prediction(Task.DOC_GENERAL_QA, "no phrase at all") is None
        assert parse_prediction(Task.DOC_GENERAL_QA, "The answer is [insert answer here]") is None
        # the first phrase present wins, then its last occurrence
        text = "correct answer is A. Finally the answer is B"
        assert parse_prediction(Task.DOC_GENERAL_QA, text) == "B"

    def test_wrapped_reference_is_unwrapped(self):
        assert score(Task.DOC_GENERAL_QA, "The answer is Rome", "The correct answer is Rome") == 1.0

    def test_bad_metric_raises(self):
        with pytest.raises(ValueError, match="qa_metric"):
            score(Task.DOC_GENERAL_QA, "x", "y", qa_metric="rouge")


class TestMC:
    @pytest.mark.parametrize(
        ("text", "letter"),
        [
            ("The correct answer is (B).", "B"),
            ("so \\boxed{C}", "C"),
            ("the answer is D", "D"),
            ("The **correct answer is A**", "A"),
            ("the answer is e", None),
            ("The correct answer is Bananas", None),
        ],
    )
    def test_parse(self, text, letter):
        assert parse_prediction(Task.DOC_MC, text) == letter

    def test_score(self):
        assert score(Task.DOC_MC, "The correct answer is B", "B") == 1.0
        assert score(Task.DOC_MC, "The correct answer is B", "The correct answer is B") == 1.0
        assert score(Task.DOC_MC, "The correct answer is C", "B") == 0.0
        assert score(Task.DOC_MC, "The correct answer is C", "not a letter") == 0.0


class TestDocMath:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("$1,234.5 million", 1234.5),
            ("5.", 5.0),
            ("(5)", 5.0),
            ("5/8", 0.625),
            ("3 x 10^6", 3e6),
            ("2 × 3", 6.0),
            ("10%", 10.0),
            ("approximately 5 or 6", 5.0),
            ("-$5", -5.0),
            ("\u22125.5", -5.5),  # unicode minus keeps its sign
            ("12 km", 12.0),
            ("USD 300", 300.0),
            ("x = 42", 42.0),
            ("1e5", 1e5),
            ("€7", 7.0),
            ("", None),
            ("True", None),
            ("(a)", None),
            ("1,2", None),
            ("10^400", None),
            ("2 ** 9999999", None),
            ("nan", None),
        ],
    )
    def test_parse_number(self, text, value):
        assert parse_number(text) == value

    def test_parse_number_never_runs_code(self, tmp_path):
        marker = tmp_path / "pwned"
        for code in (
            f"__import__('os').system('touch {marker}')",
            f"open('{marker}', 'w')",
            "().__class__.__bases__[0].__subclasses__()",
            "[1, 2]",
            "lambda: 1",
        ):
            assert parse_number(code) is None
        assert not marker.exists()

    def test_response_forms(self):
        assert score(Task.DOCMATH_QA, "Therefore, the answer is 1,234.", "1234") == 1.0
        assert score(Task.DOCMATH_QA, "So \\boxed{\\frac{1}{2}} ... \\boxed{12.5}", "12.5") == 1.0
        assert score(Task.DOCMATH_QA, "the answer is (42)", "42") == 1.0
        assert score(Task.DOCMATH_QA, "the answer is 41", "42") == 0.0
        assert score(Task.DOCMATH_QA, "no number here", "42") == 0.0

    def test_tolerance_and_scale_rules(self):
        assert compare_two_numbers(100.1, 100.0)  # within 0.15 %
        assert not compare_two_numbers(100.2, 100.0)
        assert compare_two_numbers(0.125, 12.5)  # x100 (percent vs fraction)
        assert compare_two_numbers(5_000_000.0, 5.0)  # x1e6
        assert compare_two_numbers(1.2341, 1.2345)  # ceil to 3 decimals equal
        assert not compare_two_numbers(float("inf"), 1.0)

    def test_section9_sign_must_match(self):
        """Decision: the reference's sign-blind rounding (and scale) branch is fixed; -5 != 5."""
        assert not compare_two_numbers(-5.0, 5.0)
        assert not compare_two_numbers(-500.0, 5.0)  # scale branch is sign-aware too
        assert compare_two_numbers(-5.0, -5.0)
        assert score(Task.DOCMATH_QA, "the answer is -5", "5") == 0.0
        assert score(Task.DOCMATH_QA, "the answer is -5", "-5") == 1.0
        assert score(Task.DOCMATH_QA, "the answer is \u22125", "-5") == 1.0  # unicode minus
        assert score(Task.DOCMATH_QA, "the answer is \u22125", "5") == 0.0


def test_scorer_task_dispatch():
    assert scorers.scorer_task("longbench-v2") is Task.DOC_MC
    assert scorers.scorer_task("frames") is Task.DOC_GENERAL_QA
    assert scorers.scorer_task("docmath_complong") is Task.DOCMATH_QA
    with pytest.raises(ValueError, match="no scorer"):
        scorers.scorer_task("imagenet")


# What the reference parsers (`SPELL/verl/verl/utils/reward_score/long.py` and `docmath.py`,
# `parse_model_answer(extract_solution(text))`) return on these strings, read off by running them; the
# rows marked DEVIATION are the one documented change (scorers module docstring).
MC_PARITY = [
    ("The correct answer is: B", None),
    ("The correct answer is\nB", None),
    ("The correct answer is (B).", "B"),
    ("The correct answer is B", "B"),
    ("The correct answer is A.", "A"),
    ("The correct answer is b", None),
    ("the answer is e", None),
    ("so \\boxed{C}", "C"),
    ("\\boxed{ B }", None),
    ("The **correct answer is A**", "A"),
    ("The answer is (C), not the correct answer is D", "D"),  # first pattern that matches wins
]
MC_DEVIATIONS = [
    ("The correct answer is Based on the text, (C)", "B", None),
    ("The correct answer is Both", "B", None),
    ("The correct answer is Bananas", "B", None),
]
DOCMATH_PARITY = [
    ("the answer is: 42", None),
    ("the answer is  42", None),
    ("the answer is $ 42", None),
    ("the answer is \\$42", None),
    ("the answer is ≈=42", None),  # the prefix symbols come in a fixed order
    ("the answer is $42", "$42"),
    ("the answer is =≈42", "=≈42"),
    ("the answer is (42)", "42"),
    ("the answer is 42%", "42"),
    ("Therefore, the answer is 1,234.", "1234"),
    ("The answer is -5.5.", "-5.5"),
    ("a \\boxed{12} b \\boxed{15", None),  # the last box is unbalanced: no earlier box
    ("So \\boxed{\\frac{1}{2}} ... \\boxed{12.5}", "12.5"),
]


@pytest.mark.parametrize(("text", "reference"), MC_PARITY)
def test_mc_parity_with_reference_parser(text, reference):
    assert parse_prediction(Task.DOC_MC, text) == reference


@pytest.mark.parametrize(("text", "reference", "ours"), MC_DEVIATIONS)
def test_mc_letter_must_end_a_word(text, reference, ours):
    """DEVIATION: the reference reads the first letter of any word after "answer is"."""
    assert reference != ours
    assert parse_prediction(Task.DOC_MC, text) == ours
    assert score(Task.DOC_MC, text, "B") == 0.0


@pytest.mark.parametrize(("text", "reference"), DOCMATH_PARITY)
def test_docmath_parity_with_reference_parser(text, reference):
    assert parse_prediction(Task.DOCMATH_QA, text) == reference
    if reference is None:
        assert score(Task.DOCMATH_QA, text, "42") == 0.0


def test_docmath_unbalanced_last_box_scores_zero():
    """An abandoned or truncated last box is no answer, even when an earlier box was right."""
    text = "...\\boxed{12}. Wait, recompute ... \\boxed{15"
    assert parse_prediction(Task.DOCMATH_QA, text) is None
    assert score(Task.DOCMATH_QA, text, "12") == 0.0
    assert score(Task.DOCMATH_QA, "...\\boxed{12}. Wait ... \\boxed{15}", "15") == 1.0
