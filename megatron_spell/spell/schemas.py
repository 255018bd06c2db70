"""JSON schemas of the questioner's answer object per task (spec section 2.1, the JSON keys).

Used only when `rollout.questioner_json_schema=true`: the rollout engine then constrains the questioner's
sampling to the schema (vLLM structured outputs). Deliberate deviation from the reference, for small models
that cannot yet follow the format (the CPU demo's SmolLM2-135M never writes a parseable question without it):
the questioner writes the JSON object directly, without its reasoning and without the fenced block, so the
bad_format case cannot occur, and the sampled tokens come from the constrained distribution (the policy
gradient on them is then slightly off-policy; the logprob mismatch metric shows by how much). Off by default.
"""

from __future__ import annotations

from typing import Any

from megatron_spell.types import Task

_TEXT = {"type": "string", "minLength": 1, "maxLength": 400}

SCHEMAS: dict[Task, dict[str, Any]] = {
    Task.DOC_GENERAL_QA: {
        "type": "object",
        "properties": {
            "question": _TEXT,
            "answer": {"type": "string", "minLength": 1, "maxLength": 120},
        },
        "required": ["question", "answer"],
        "additionalProperties": False,
    },
    Task.DOC_MC: {
        "type": "object",
        "properties": {
            "question": _TEXT,
            "options": {
                "type": "object",
                "properties": {
                    k: {"type": "string", "minLength": 1, "maxLength": 200} for k in "ABCD"
                },
                "required": list("ABCD"),
                "additionalProperties": False,
            },
            "answer": {"type": "string", "enum": list("ABCD")},
        },
        "required": ["question", "options", "answer"],
        "additionalProperties": False,
    },
    Task.DOCMATH_QA: {
        "type": "object",
        "properties": {"question": _TEXT, "answer": {"type": "number"}},
        "required": ["question", "answer"],
        "additionalProperties": False,
    },
}


def questioner_schema(task: Task | str) -> dict[str, Any]:
    """The JSON schema a questioner answer of `task` must satisfy."""
    return SCHEMAS[Task(task)]
