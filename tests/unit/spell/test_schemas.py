"""Outputs that satisfy a role's structured-output constraint are accepted by that role's parser/scorer."""

import json
import re

import jsonschema
import pytest

from megatron_spell.spell import scorers, verifier
from megatron_spell.spell.parsing import parse_questioner
from megatron_spell.spell.schemas import (
    RESPONDER_PATTERNS,
    VERIFIER_PATTERN,
    output_constraint,
    questioner_schema,
)
from megatron_spell.types import OutputConstraint, ParsedQA, Role, Task

VALID = {
    Task.DOC_GENERAL_QA: {"question": "Who built the bridge?", "answer": "Anna Lopez"},
    Task.DOC_MC: {
        "question": "Which year?",
        "options": {"A": "1987", "B": "1989", "C": "1990", "D": "2001"},
        "answer": "A",
    },
    Task.DOCMATH_QA: {"question": "How long in total?", "answer": 480.5},
}


@pytest.mark.parametrize("task", list(Task))
def test_schema_objects_parse(task):
    schema = questioner_schema(task)
    obj = VALID[task]
    assert set(schema["required"]) == set(obj)
    jsonschema.validate(obj, schema)
    # the engine's constrained output is the bare object (no fence): the parser must accept it
    parsed = parse_questioner(task, json.dumps(obj, indent=2))
    assert isinstance(parsed, ParsedQA), parsed


# texts that fully match the responder pattern, with the reference answer and the expected rule score
RESPONSES = {
    Task.DOC_GENERAL_QA: [
        ("The correct answer is Anna Lopez", "Anna Lopez", 1.0),
        ("The correct answer is Maria", "Anna Lopez", 0.0),
    ],
    Task.DOC_MC: [("The correct answer is C", "C", 1.0), ("The correct answer is B", "C", 0.0)],
    Task.DOCMATH_QA: [
        ("Therefore, the answer is 480.5", "480.5", 1.0),
        ("Therefore, the answer is -12", "12", 0.0),
    ],
}


@pytest.mark.parametrize("task", list(Task))
def test_responder_pattern_outputs_are_scored(task):
    pattern = re.compile(RESPONDER_PATTERNS[task])
    for text, reference, expected in RESPONSES[task]:
        assert pattern.fullmatch(text), text
        assert scorers.parse_prediction(task, text) is not None
        assert scorers.score(task, text, reference) == expected
    assert not pattern.fullmatch("I think the answer is C")


def test_verifier_pattern_outputs_are_votes():
    pattern = re.compile(VERIFIER_PATTERN)
    assert pattern.fullmatch("[[YES]]") and pattern.fullmatch("[[NO]]")
    assert not pattern.fullmatch("[[MAYBE]]")
    assert verifier.parse_vote("[[YES]]") == verifier.YES
    assert verifier.parse_vote("[[NO]]") == verifier.NO


def test_output_constraint_per_role():
    assert output_constraint("questioner", Task.DOC_MC).json_schema == questioner_schema(
        Task.DOC_MC
    )
    assert output_constraint("responder", "doc_mc").regex == RESPONDER_PATTERNS[Task.DOC_MC]
    assert output_constraint(Role.VERIFIER, Task.DOCMATH_QA).regex == VERIFIER_PATTERN
    assert output_constraint("verifier") == output_constraint("verifier", Task.DOC_MC)
    with pytest.raises(ValueError):
        output_constraint("judge", Task.DOC_MC)
    with pytest.raises(ValueError, match="depends on the task"):
        output_constraint("responder")
    with pytest.raises(ValueError, match="exactly one"):
        OutputConstraint()
