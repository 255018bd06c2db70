"""Structured-output constraints per role and task (docs/spell-algorithm.md §2.1-§2.4, the answer
formats).

Used only for the roles named in `rollout.structured_outputs` (off by default, as in the reference):
the rollout engine then constrains that role's sampling with vLLM structured outputs. A deliberate
deviation for small models that cannot yet follow the formats; the CPU demo's SmolLM2-135M writes no
parseable question, answer or verdict without it, so every group has zero variance and nothing is
trained.

* questioner: the task's JSON object (`TaskSpec.questioner_schema`, spell/tasks/), written directly,
  without the reasoning and the fenced block, so the bad_format case cannot occur;
* responder (and the grounding pre-filter, which is a responder call): the §2.2 answer sentence
  alone, with no reasoning before it (`TaskSpec.responder_pattern`), which the task's scorer parses;
* verifier: the §2.4 decision alone, `[[YES]]` or `[[NO]]` (`VERIFIER_PATTERN`).

The sampled tokens then come from the constrained (masked) distribution, while the policy gradient
uses the unconstrained policy's log-probabilities, so the update is slightly off-policy; the
train/infer mismatch metric shows by how much.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from megatron_spell.spell import tasks
from megatron_spell.spell.tasks import TaskSpec
from megatron_spell.types import OutputConstraint, Role, Task

VERIFIER_PATTERN = r"\[\[(YES|NO)\]\]"


class _PerTask(Mapping):
    """A read-only view of one field of every registered task record, keyed by task."""

    def __init__(self, field: str) -> None:
        self._field = field

    def __getitem__(self, task: Task | str) -> Any:
        spec: TaskSpec | None = tasks.find(task)
        if spec is None:
            raise KeyError(task)
        return getattr(spec, self._field)

    def __iter__(self) -> Iterator[Task | str]:
        return iter(spec.task for spec in tasks.specs())

    def __len__(self) -> int:
        return len(tasks.specs())


# the questioner's JSON object per task (`TaskSpec.questioner_schema`)
SCHEMAS: Mapping[Task | str, Mapping[str, Any]] = _PerTask("questioner_schema")
# one answer sentence in the docs/spell-algorithm.md §2.2 form per task
# (`TaskSpec.responder_pattern`); the task's `parse_prediction` accepts every sentence the pattern
# matches
RESPONDER_PATTERNS: Mapping[Task | str, str] = _PerTask("responder_pattern")


def questioner_schema(task: Task | str) -> dict[str, Any]:
    """The JSON schema a questioner answer of `task` must satisfy."""
    return dict(tasks.get(task).questioner_schema)


def output_constraint(role: Role | str, task: Task | str | None = None) -> OutputConstraint:
    """The structured-output constraint of `role` answering a `task` prompt (the verifier's needs no task)."""
    role = Role(role)
    if role is Role.VERIFIER:
        return OutputConstraint(regex=VERIFIER_PATTERN)
    if task is None:
        raise ValueError(
            f"output_constraint: the {role.value} format depends on the task; pass one"
        )
    spec = tasks.get(task)
    if role is Role.QUESTIONER:
        return OutputConstraint(json_schema=dict(spec.questioner_schema))
    return OutputConstraint(regex=spec.responder_pattern)
