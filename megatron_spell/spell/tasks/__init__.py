"""The task registry: one `TaskSpec` record per SPELL task, shared by training and evaluation.

A task (docs/spell-algorithm.md §2) is everything the roles need to know about one kind of question:
the questioner's rules and JSON example, the responder's template, the three parsers (questioner
output, response, reference), the rule scorer, the structured-output schema and responder pattern,
and which data-source names route to it. `spell/parsing.py`, `scorers.py`, `schemas.py`,
`prompts.py` and `eval/formats.py` look a task up here instead of branching on its name, so a new
task is one module that calls `register`. A module that follows the built-ins' naming (`RULES` or
`questioner_rules`, `JSON_EXAMPLE`, `ESCALATION`, `RESPONDER`, `SCHEMA`, `RESPONDER_PATTERN`,
`parse_questioner`, `parse_prediction`, `parse_reference`, `score`, `gold_text`) builds its spec
with `module_spec(globals(), ...)`; `object_schema`, `responder_template` and `bad_question` are the
pieces the built-ins share.

Built-in tasks (`general_qa.py`, `mc.py`, `docmath.py`, each exporting `SPEC`) are keyed by their
`types.Task` member; a task registered elsewhere may be keyed by a plain name. The built-ins are
loaded on the first lookup, so the modules whose primitives they use (scorers) can import this
package without an import cycle, and they always come first in the registry.

Data-source routing (`for_data_source`) is the training scorer dispatch of §3.1
(`SPELL/verl/verl/utils/reward_score/__init__.py:83-93`): the registered tasks are asked in
registration order (doc_mc, doc_general_qa, docmath_qa, then any later ones) and the first whose
keywords occur in the name (ignoring case) wins; a name that no task accepts is an error, never a
silent default.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from megatron_spell.types import CaseType, ParsedQA, Rejected, Task


@dataclass(frozen=True)
class TaskSpec:
    """Everything training and evaluation need to know about one task (module docstring)."""

    task: Task | str
    """The registry key: a `types.Task` member for the built-ins, a plain name for others."""

    questioner_rules: Callable[[str | None], str]
    """The questioner's task rules, given the optional answer letter the caller drew (doc_mc only)."""

    questioner_json: str
    """The fenced JSON example that closes the questioner's instructions."""

    escalation: str
    """Ways to make a question harder, shown by the with-history questioner prompt
    (docs/spell-algorithm.md §2.1)."""

    responder_template: str
    """The responder's user message, with `{documents}` and `{question}` fields
    (docs/spell-algorithm.md §2.2)."""

    parse_questioner: Callable[[dict[str, Any], Callable[[str], int], int], ParsedQA | Rejected]
    """Field rules of docs/spell-algorithm.md §1.3 step 4: (JSON object, count_tokens,
    max_answer_tokens) -> result."""

    parse_prediction: Callable[[str], str | None]
    """The parsed answer of a full response (what the verifier sees), or None."""

    parse_reference: Callable[[str], str | None]
    """The bare reference answer; a reference phrased "The correct answer is X" is unwrapped."""

    score: Callable[[str, str, str], float]
    """Rule score in [0, 1] of a parsed prediction against a parsed reference, given the QA metric."""

    gold_text: Callable[[Any], str]
    """The bare reference text of a dataset's gold answer (a JSON value), as the scorer expects it."""

    questioner_schema: Mapping[str, Any]
    """JSON schema of the questioner's answer object under structured outputs (spell/schemas.py)."""

    responder_pattern: str
    """Regex of the docs/spell-algorithm.md §2.2 answer sentence under structured outputs;
    `parse_prediction` accepts it."""

    source_keywords: tuple[str, ...]
    """A data-source name containing one of these (case-insensitively) routes here
    (docs/spell-algorithm.md §3.1)."""

    @property
    def name(self) -> str:
        return _key(self.task)

    def matches_source(self, data_source: str) -> bool:
        """Whether `data_source` contains one of `source_keywords`, ignoring case."""
        name = data_source.lower()
        return any(k.lower() in name for k in self.source_keywords)


# the `TaskSpec` fields `module_spec` reads from a task module, by the module's name for them
_MODULE_FIELDS = {
    "questioner_json": "JSON_EXAMPLE",
    "escalation": "ESCALATION",
    "responder_template": "RESPONDER",
    "parse_questioner": "parse_questioner",
    "parse_prediction": "parse_prediction",
    "parse_reference": "parse_reference",
    "score": "score",
    "gold_text": "gold_text",
    "questioner_schema": "SCHEMA",
    "responder_pattern": "RESPONDER_PATTERN",
}


def module_spec(
    namespace: Mapping[str, Any], task: Task | str, source_keywords: tuple[str, ...]
) -> TaskSpec:
    """The spec of a task module that uses the built-ins' names (module docstring); `namespace` is
    the module's `globals()`. Without a `questioner_rules` function the rules are `RULES`, whatever
    the answer letter."""
    rules = namespace.get("questioner_rules")
    if rules is None:
        text = namespace["RULES"]

        def rules(answer_letter: str | None) -> str:
            return text

    return TaskSpec(
        task=task,
        questioner_rules=rules,
        source_keywords=source_keywords,
        **{field: namespace[name] for field, name in _MODULE_FIELDS.items()},
    )


# the questioner's `question` field under structured outputs, the same for every built-in task
QUESTION_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 400}


def object_schema(**properties: Any) -> dict[str, Any]:
    """JSON schema of an object with exactly these properties, all required, in this order (each
    property schema copied, so that no two task schemas share a dict)."""
    return {
        "type": "object",
        "properties": copy.deepcopy(properties),
        "required": list(properties),
        "additionalProperties": False,
    }


def responder_template(instructions: str, question: str = "Question: {question}") -> str:
    """A responder message: the instructions, the `{documents}` inside `<text>` tags, then the
    question line."""
    return f"{instructions}\n\n<text>\n{{documents}}\n</text>\n\n{question}"


def bad_question(task: str, question: Any) -> Rejected | None:
    """The bad_format rejection of a questioner object whose `question` is not a non-empty string."""
    if isinstance(question, str) and question.strip():
        return None
    return Rejected(CaseType.BAD_FORMAT, f"{task}: 'question' must be a non-empty string")


_REGISTRY: dict[str, TaskSpec] = {}
_BUILTINS_LOADED = False
# registration order is the data-source routing order: "longbench_v2" must reach doc_mc before
# doc_general_qa's "longbench" keyword sees it
_BUILTIN_MODULES = ("mc", "general_qa", "docmath")


def _key(task: Task | str) -> str:
    return task.value if isinstance(task, Task) else str(task)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    for module in _BUILTIN_MODULES:
        spec = importlib.import_module(f"{__name__}.{module}").SPEC
        _REGISTRY[spec.name] = spec
    _BUILTINS_LOADED = True


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task; its name must be new. Returns the spec (so a module can `SPEC = register(...)`)."""
    _load_builtins()
    if spec.name in _REGISTRY:
        raise ValueError(f"task {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(task: Task | str) -> None:
    """Remove a task that `register` added (tests use it to clean up a throwaway entry)."""
    _REGISTRY.pop(_key(task), None)


def specs() -> tuple[TaskSpec, ...]:
    """All registered tasks, in registration (routing) order."""
    _load_builtins()
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """The names of all registered tasks, in registration order."""
    return tuple(s.name for s in specs())


def find(task: Task | str) -> TaskSpec | None:
    """The spec registered under `task`, or None."""
    _load_builtins()
    return _REGISTRY.get(_key(task))


def get(task: Task | str) -> TaskSpec:
    """The spec registered under `task`; ValueError naming the registered tasks otherwise."""
    spec = find(task)
    if spec is None:
        raise ValueError(f"unknown task {_key(task)!r}: expected one of {', '.join(names())}")
    return spec


def for_data_source(data_source: str) -> TaskSpec:
    """The task a data-source name routes to (module docstring); ValueError if none accepts it."""
    for spec in specs():
        if spec.matches_source(str(data_source)):
            return spec
    keywords = ", ".join(k for s in specs() for k in s.source_keywords)
    raise ValueError(
        f"no scorer for data source {data_source!r}: expected a name containing one of {keywords}, "
        f"or name the task explicitly"
    )


def resolve(task_or_source: Task | str) -> TaskSpec:
    """A registered task by name, else the task its data-source name routes to (`for_data_source`)."""
    return find(task_or_source) or for_data_source(_key(task_or_source))


__all__ = [
    "QUESTION_SCHEMA",
    "TaskSpec",
    "bad_question",
    "find",
    "for_data_source",
    "get",
    "module_spec",
    "names",
    "object_schema",
    "register",
    "resolve",
    "responder_template",
    "specs",
    "unregister",
]
