"""Prompt structure (docs/spell-algorithm.md §2.1, §2.2, §2.4) and the D1 / D5 decisions."""

import json
import re

import pytest

from megatron_spell.spell.parsing import extract_json
from megatron_spell.spell.prompts import (
    NO_CONTEXT,
    questioner_prompt,
    responder_prompt,
    verifier_prompt,
)
from megatron_spell.types import HistoryEntry, Task

DOCS = ["Doc one {with braces}.", "Doc two."]


@pytest.mark.parametrize("task", list(Task))
def test_questioner_structure(task):
    text = questioner_prompt(task, DOCS, [])
    assert text.rstrip().endswith("</text>")  # documents at the end
    assert "<text>\nDoc one {with braces}.\nDoc two.\n</text>" in text
    assert "```json" in text and "Previous Examples" not in text
    # docs/spell-algorithm.md D5: the JSON example is valid JSON once its placeholders are filled
    example = re.search(r"```json\n(.*?)\n```", text, re.DOTALL).group(1)
    filled = example.replace("<the number>", "1")
    assert isinstance(json.loads(filled), dict)
    assert extract_json("```json\n" + filled + "\n```")


@pytest.mark.parametrize("task", list(Task))
def test_history_variant(task):
    history = [HistoryEntry((0,), "Q1?", "A1"), ("Q2?", "A2")]
    text = questioner_prompt(task, DOCS, history)
    assert "harder" in text
    tail = text.split("Previous Examples:", 1)[1]
    assert (
        "### Example 1:\nQuestion: Q1?\nAnswer: A1\n\n### Example 2:\nQuestion: Q2?\nAnswer: A2"
        in tail
    )


def test_section9_mc_letter_placeholder_is_filled():
    """Decision (docs/spell-algorithm.md D1): the answer letter is named when given, and no raw
    placeholder is ever left."""
    for letter in "ABCD":
        text = questioner_prompt(Task.DOC_MC, DOCS, answer_letter=letter)
        assert f"must be option {letter}" in text
        assert "<correct_answer>" not in text
    assert "<correct_answer>" not in questioner_prompt(Task.DOC_MC, DOCS)
    with pytest.raises(ValueError, match="answer_letter"):
        questioner_prompt(Task.DOC_MC, DOCS, answer_letter="E")


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="unknown task"):
        questioner_prompt("poetry", DOCS)
    with pytest.raises(ValueError, match="unknown task"):
        responder_prompt("poetry", "d", "q")


def test_responder_answer_forms():
    assert "Therefore, the answer is X" in responder_prompt(Task.DOCMATH_QA, "D", "q")
    for task in (Task.DOC_MC, Task.DOC_GENERAL_QA):
        assert "The correct answer is X" in responder_prompt(task, "D", "q")
    text = responder_prompt(Task.DOC_GENERAL_QA, NO_CONTEXT, "Who {x}?")
    assert "<text>\nEmpty\n</text>" in text and text.endswith("Question: Who {x}?")


def test_verifier_prompt():
    text = verifier_prompt("What {is} it?", "12", "12.0")
    assert "Answer 1: 12" in text and "Answer 2: 12.0" in text and "What {is} it?" in text
    assert "[[YES]]" in text and "[[NO]]" in text and "0.15%" in text
