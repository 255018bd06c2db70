"""Questioner output parsing and the grounding pre-filter decision (docs/spell-algorithm.md §1.3 and
§1.4).

Pipeline for one questioner completion: `strip_thinking` -> `extract_json` -> the task's field rules
(`TaskSpec.parse_questioner` in spell/tasks/) -> `ParsedQA` or `Rejected(case)`. Nothing here raises
on model text: arbitrary, huge or adversarial strings are classified, never evaluated.

Deliberate decisions (§9; the per-task field-rule decisions are in the task modules):

* D5, trailing commas: our questioner prompts show valid JSON (no trailing comma), and
  `extract_json` additionally retries a candidate with trailing commas before `}` / `]` removed, so
  the one common slip in model-written JSON does not cost a bad_format penalty.
* D6, silent drops: every silent skip (unclosed think, invalid docmath number, boolean docmath
  answer, overlong answer) is returned as `Rejected(CaseType.DROPPED, reason)` so the caller can
  count it; it is never penalised.
* §9 item 8, doc_mc random guesses: `is_bad_ground` takes any number of no-context scores and
  compares their MEAN with the threshold. With one sample and 0.1 it is the reference rule; a caller
  can pass several samples (and a threshold above the 25 % guess rate) to stop rewarding chance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from megatron_spell.spell import tasks
from megatron_spell.types import CaseType, ParsedQA, Rejected, Task

EMPTY = "Empty"  # the reference's sentinel for an unclosed thinking block
MAX_JSON_CHARS = (
    200_000  # candidates larger than this are not parsed (bounded work on huge outputs)
)

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_JSON_BLOCK_RE = re.compile(r"```json(.*?)```", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")


def strip_thinking(text: str) -> str:
    """Text after the last `</think>`; the whole text without think tags; `EMPTY` if thinking never closed."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return EMPTY
    return text


def _loads_object(candidate: str) -> dict[str, Any] | None:
    candidate = candidate.strip()
    if not candidate or len(candidate) > MAX_JSON_CHARS:
        return None
    for attempt in (candidate, _TRAILING_COMMA_RE.sub(r"\1", candidate)):
        try:
            value = json.loads(attempt)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def extract_json(text: str) -> dict[str, Any]:
    """The last fenced json block that parses as an object, else the whole string, else `{}`
    (`SPELL/verl/verl/utils/dataset/spell_dataset.py:62-95`).

    Control characters below 0x20 other than newline, carriage return and tab are removed first.
    """
    text = _CONTROL_RE.sub("", text)
    for block in reversed(_JSON_BLOCK_RE.findall(text)):
        value = _loads_object(block)
        if value is not None:
            return value
    value = _loads_object(text)
    return value if value is not None else {}


def _whitespace_tokens(text: str) -> int:
    return len(text.split())


def parse_questioner(
    task: Task | str,
    text: str,
    *,
    count_tokens: Callable[[str], int] | None = None,
    max_answer_tokens: int = 40,
) -> ParsedQA | Rejected:
    """Parse one questioner completion into a `ParsedQA` or a `Rejected` with its case
    (docs/spell-algorithm.md §1.3).

    `count_tokens` measures the doc_general_qa answer; pass the policy tokenizer's length function. The default
    counts whitespace-separated words, which is only a stand-in for tests.
    """
    spec = tasks.find(task)
    if spec is None:
        return Rejected(CaseType.BAD_FORMAT, f"no parser for task {task!r}")
    if not isinstance(text, str):
        return Rejected(CaseType.BAD_FORMAT, "questioner output is not text")
    body = strip_thinking(text)
    if body == EMPTY:
        return Rejected(CaseType.DROPPED, "thinking block never closed")
    record = extract_json(body)
    if not record:
        return Rejected(CaseType.BAD_FORMAT, "no JSON object found")
    return spec.parse_questioner(record, count_tokens or _whitespace_tokens, max_answer_tokens)


def is_bad_ground(no_context_scores: Sequence[float], threshold: float = 0.1) -> bool:
    """Grounding pre-filter (docs/spell-algorithm.md §1.4): True when the question is answerable
    without its documents.

    The mean rule score of the no-context answers is compared with `threshold` (>= means bad_ground). One
    sample and 0.1 reproduce the reference. An empty sequence (no no-context answer) is not bad_ground.
    """
    if not no_context_scores:
        return False
    return sum(no_context_scores) / len(no_context_scores) >= threshold
