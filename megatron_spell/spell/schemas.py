"""Structured-output constraints per role and task (spec sections 2.1-2.4, the answer formats).

Used only for the roles named in `rollout.structured_outputs` (off by default, as in the reference): the
rollout engine then constrains that role's sampling with vLLM structured outputs. A deliberate deviation for
small models that cannot yet follow the formats; the CPU demo's SmolLM2-135M writes no parseable question,
answer or verdict without it, so every group has zero variance and nothing is trained.

* questioner: the task's JSON object (`SCHEMAS`), written directly, without the reasoning and the fenced block,
  so the bad_format case cannot occur;
* responder (and the grounding pre-filter, which is a responder call): the spec 2.2 answer sentence alone,
  with no reasoning before it (`RESPONDER_PATTERNS`), which the scorers of spec 3.1 parse;
* verifier: the spec 2.4 decision alone, `[[YES]]` or `[[NO]]` (`VERIFIER_PATTERN`).

The sampled tokens then come from the constrained (masked) distribution, while the policy gradient uses the
unconstrained policy's log-probabilities, so the update is slightly off-policy; the train/infer mismatch metric
shows by how much.
"""

from __future__ import annotations

from typing import Any

from megatron_spell.types import OutputConstraint, Role, Task

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


# one answer sentence in the spec 2.2 form; the scorers (spell/scorers.py) take what follows "answer is"
RESPONDER_PATTERNS: dict[Task, str] = {
    Task.DOC_GENERAL_QA: r"The correct answer is [^\n]{1,100}",
    Task.DOC_MC: r"The correct answer is [ABCD]",
    Task.DOCMATH_QA: r"Therefore, the answer is -?[0-9]{1,12}(\.[0-9]{1,6})?",
}
VERIFIER_PATTERN = r"\[\[(YES|NO)\]\]"


def questioner_schema(task: Task | str) -> dict[str, Any]:
    """The JSON schema a questioner answer of `task` must satisfy."""
    return SCHEMAS[Task(task)]


def output_constraint(role: Role | str, task: Task | str | None = None) -> OutputConstraint:
    """The structured-output constraint of `role` answering a `task` prompt (the verifier's needs no task)."""
    role = Role(role)
    if role is Role.VERIFIER:
        return OutputConstraint(regex=VERIFIER_PATTERN)
    if task is None:
        raise ValueError(
            f"output_constraint: the {role.value} format depends on the task; pass one"
        )
    if role is Role.QUESTIONER:
        return OutputConstraint(json_schema=SCHEMAS[Task(task)])
    return OutputConstraint(regex=RESPONDER_PATTERNS[Task(task)])
