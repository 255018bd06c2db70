"""Questioner parsing (docs/spell-algorithm.md §1.3), the grounding decision (1.4) and the D5, §9
item 8 and D6 decisions."""

import json

import pytest

from megatron_spell.spell.parsing import (
    EMPTY,
    extract_json,
    is_bad_ground,
    parse_questioner,
    strip_thinking,
)
from megatron_spell.types import CaseType, ParsedQA, Rejected, Task


def fenced(obj) -> str:
    return "Some reasoning first.\n```json\n" + json.dumps(obj) + "\n```"


def test_strip_thinking():
    assert strip_thinking("<think>a</think>b</think>c") == "c"
    assert strip_thinking("<think>never closed") == EMPTY
    assert strip_thinking("plain") == "plain"


def test_extract_json_last_object_block_wins():
    text = '```json\n{"a": 1}\n```\nthen\n```json\n{"a": 2}\n```\n```json\n[1, 2]\n```'
    assert extract_json(text) == {"a": 2}  # a list block is skipped


def test_extract_json_whole_string_and_fallback():
    assert extract_json('{"question": "q"}') == {"question": "q"}
    assert extract_json("nothing here") == {}
    assert extract_json("```json\n{broken\n```") == {}
    assert extract_json('{"a": "x\x01y"}') == {"a": "xy"}  # control characters dropped


def test_section9_trailing_comma_is_tolerated():
    """Decision (docs/spell-algorithm.md D5): a trailing comma, which the reference's own example
    invites, still parses."""
    assert extract_json('```json\n{"question": "q", "answer": "a",}\n```') == {
        "question": "q",
        "answer": "a",
    }


class TestDocMath:
    def test_accepts_numbers_and_strings(self):
        out = parse_questioner(Task.DOCMATH_QA, fenced({"question": "How much?", "answer": 12.50}))
        assert out == ParsedQA(Task.DOCMATH_QA, "How much?", "12.5", "How much?")
        out = parse_questioner("docmath_qa", fenced({"question": "q", "answer": "$1,200 million"}))
        assert isinstance(out, ParsedQA) and out.answer == "1200"
        out = parse_questioner(
            "docmath_qa", fenced({"question": "q", "answer": "The answer is 7."})
        )
        assert isinstance(out, ParsedQA) and out.answer == "7"

    @pytest.mark.parametrize(
        ("obj", "case"),
        [
            ({"answer": 3}, CaseType.BAD_FORMAT),
            ({"question": "q"}, CaseType.BAD_FORMAT),
            ({"question": "q", "answer": [1, 2]}, CaseType.BAD_FORMAT),
            ({"question": "q", "answer": 0}, CaseType.DROPPED),
            ({"question": "q", "answer": "several: 1 and 2"}, CaseType.DROPPED),
            ({"question": "q", "answer": "__import__('os').getcwd()"}, CaseType.DROPPED),
        ],
    )
    def test_rejections(self, obj, case):
        out = parse_questioner(Task.DOCMATH_QA, fenced(obj))
        assert isinstance(out, Rejected) and out.case is case

    def test_section9_boolean_answers_are_dropped(self):
        """Decision (docs/spell-algorithm.md D4): a boolean ground truth cannot be rewarded, so it
        is dropped (no penalty), whether written as a string or as a JSON boolean; the reference
        keeps `true` as gt "True"."""
        for answer in (True, False, "True", "yes", "false"):
            out = parse_questioner(Task.DOCMATH_QA, fenced({"question": "q", "answer": answer}))
            assert isinstance(out, Rejected) and out.case is CaseType.DROPPED, answer
        out = parse_questioner(Task.DOCMATH_QA, '```json\n{"question":"q","answer":true}\n```')
        assert isinstance(out, Rejected) and out.case is CaseType.DROPPED


class TestMC:
    OPTIONS = {"A": "one", "B": "two", "C": "three", "D": "four"}

    def test_block_and_letter(self):
        out = parse_questioner(
            Task.DOC_MC, fenced({"question": "Which?", "options": self.OPTIONS, "answer": "C"})
        )
        assert isinstance(out, ParsedQA)
        assert out.answer == "C" and out.raw_question == "Which?"
        assert out.question.splitlines()[1:] == [
            "Which?",
            "Choices:",
            "(A) one",
            "(B) two",
            "(C) three",
            "(D) four",
        ]
        out = parse_questioner(
            Task.DOC_MC,
            fenced({"question": "Which?", "options": self.OPTIONS, "answer": "The answer is B"}),
        )
        assert isinstance(out, ParsedQA) and out.answer == "B"

    @pytest.mark.parametrize(
        "obj",
        [
            {"question": "q", "options": {"A": 1, "B": 2, "C": 3}, "answer": "A"},
            {"question": "q", "options": ["a", "b", "c", "d"], "answer": "A"},
            {"question": "q", "options": OPTIONS, "answer": "E"},
            {"question": "q", "options": OPTIONS, "answer": 1},
            # as the reference: only a bare letter or an answer sentence names the option
            {"question": "q", "options": OPTIONS, "answer": "(A)"},
            {"question": "q", "options": OPTIONS, "answer": "A."},
            {"question": "q", "options": OPTIONS, "answer": " A"},
            {"question": "q", "options": OPTIONS, "answer": "a"},
        ],
    )
    def test_bad_format(self, obj):
        out = parse_questioner(Task.DOC_MC, fenced(obj))
        assert isinstance(out, Rejected) and out.case is CaseType.BAD_FORMAT


class TestGeneral:
    def test_accepts_and_unwraps(self):
        out = parse_questioner(Task.DOC_GENERAL_QA, fenced({"question": "Who?", "answer": "Ada"}))
        assert out == ParsedQA(Task.DOC_GENERAL_QA, "Who?", "Ada", "Who?")
        out = parse_questioner(
            Task.DOC_GENERAL_QA,
            fenced({"question": "Who?", "answer": "The answer is Ada Lovelace."}),
        )
        assert isinstance(out, ParsedQA) and out.answer == "Ada Lovelace"

    def test_section9_numeric_answer_accepted(self):
        """Decision (docs/spell-algorithm.md D5): a JSON number is a valid factual answer, not
        bad_format."""
        out = parse_questioner(Task.DOC_GENERAL_QA, fenced({"question": "When?", "answer": 1969}))
        assert isinstance(out, ParsedQA) and out.answer == "1969"
        out = parse_questioner(Task.DOC_GENERAL_QA, fenced({"question": "When?", "answer": True}))
        assert isinstance(out, Rejected) and out.case is CaseType.BAD_FORMAT

    def test_section9_overlong_answer_dropped_with_tokenizer_count(self):
        """Item 7: over max_answer_tokens (tokenizer count) is dropped silently (no penalty)."""
        obj = {"question": "q", "answer": "word " * 10}
        chars = len  # a stand-in tokenizer: one token per character (50 > 40)
        out = parse_questioner(Task.DOC_GENERAL_QA, fenced(obj), count_tokens=chars)
        assert isinstance(out, Rejected) and out.case is CaseType.DROPPED
        out = parse_questioner(Task.DOC_GENERAL_QA, fenced(obj))  # 10 words <= 40
        assert isinstance(out, ParsedQA)
        out = parse_questioner(Task.DOC_GENERAL_QA, fenced(obj), max_answer_tokens=5)
        assert isinstance(out, Rejected) and out.case is CaseType.DROPPED

    def test_broken_tokenizer_does_not_crash(self):
        def boom(text):
            raise RuntimeError("tokenizer down")

        out = parse_questioner(
            Task.DOC_GENERAL_QA, fenced({"question": "q", "answer": "a"}), count_tokens=boom
        )
        assert isinstance(out, ParsedQA)


def test_section9_unclosed_think_is_dropped_not_penalised():
    """Item 9: the silent skip becomes a counted DROPPED case."""
    out = parse_questioner(Task.DOC_MC, "<think>" + fenced({"question": "q"}))
    assert out == Rejected(CaseType.DROPPED, "thinking block never closed")


def test_no_json_and_unknown_task_are_bad_format():
    assert parse_questioner(Task.DOC_MC, "I refuse.").case is CaseType.BAD_FORMAT
    assert parse_questioner("poetry", fenced({"question": "q"})).case is CaseType.BAD_FORMAT


def test_section9_grounding_decision():
    """Reference rule: one no-context score >= 0.1 is bad_ground. Item 8 decision: the mean over several
    samples with a caller-chosen threshold lets doc_mc avoid penalising one lucky guess."""
    assert is_bad_ground([1.0])
    assert is_bad_ground([0.1])
    assert not is_bad_ground([0.0])
    assert not is_bad_ground([])
    assert not is_bad_ground([1.0, 0.0, 0.0, 0.0], threshold=0.5)  # one lucky guess in four
    assert is_bad_ground([1.0, 1.0, 1.0, 0.0], threshold=0.5)
