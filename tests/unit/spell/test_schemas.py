"""A JSON object valid under a task's questioner schema is accepted by that task's parser."""

import json

import pytest

from megatron_spell.spell.parsing import parse_questioner
from megatron_spell.spell.schemas import questioner_schema
from megatron_spell.types import ParsedQA, Task

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
    # the engine's constrained output is the bare object (no fence): the parser must accept it
    parsed = parse_questioner(task, json.dumps(obj, indent=2))
    assert isinstance(parsed, ParsedQA), parsed
