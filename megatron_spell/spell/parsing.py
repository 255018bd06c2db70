"""Questioner output parsing and the grounding pre-filter decision (spec sections 1.3 and 1.4).

Pipeline for one questioner completion: `strip_thinking` -> `extract_json` -> per-task field rules ->
`ParsedQA` or `Rejected(case)`. Nothing here raises on model text: arbitrary, huge or adversarial strings are
classified, never evaluated.

Deliberate decisions (spec section 9):

* Item 7, trailing commas: our questioner prompts show valid JSON (no trailing comma), and `extract_json`
  additionally retries a candidate with trailing commas before `}` / `]` removed, so the one common slip in
  model-written JSON does not cost a bad_format penalty.
* Item 7, numeric `doc_general_qa` answers: the reference penalises a JSON number as bad_format (-1). A number
  is a perfectly good factual answer ("1969"), so we accept int/float answers and store their text; booleans,
  lists and objects stay bad_format.
* Item 7, answer length: the prompt asks for a short phrase; answers above `max_answer_tokens` (40 by default,
  counted with the caller's `count_tokens`, normally the model tokenizer) are dropped without penalty, as in
  the reference.
* Item 6, boolean docmath answers: "True"/"yes" parse in the reference but can never be matched by the numeric
  scorer, so they are DROPPED here (the question cannot be rewarded).
* Item 9, silent drops: every silent skip (unclosed think, invalid docmath number, overlong answer) is returned
  as `Rejected(CaseType.DROPPED, reason)` so the caller can count it; it is never penalised.
* Item 8, doc_mc random guesses: `is_bad_ground` takes any number of no-context scores and compares their
  MEAN with the threshold. With one sample and 0.1 it is the reference rule; a caller can pass several samples
  (and a threshold above the 25 % guess rate) to stop rewarding chance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from megatron_spell.spell import scorers
from megatron_spell.types import CaseType, ParsedQA, Rejected, Task

EMPTY = "Empty"  # the reference's sentinel for an unclosed thinking block
MAX_JSON_CHARS = (
    200_000  # candidates larger than this are not parsed (bounded work on huge outputs)
)
MC_LETTERS = ("A", "B", "C", "D")

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_JSON_BLOCK_RE = re.compile(r"```json(.*?)```", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")
_ANSWER_PHRASE_RE = re.compile(r"answer is|\\boxed\{", re.IGNORECASE)


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
    """The last fenced json block that parses as an object, else the whole string, else `{}` (DS 62-95).

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


def _parse_docmath(record: dict[str, Any]) -> tuple[str, str] | Rejected:
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        return Rejected(CaseType.BAD_FORMAT, "docmath_qa: 'question' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return Rejected(CaseType.BAD_FORMAT, "docmath_qa: 'answer' must be a string or a number")
    text = str(answer)
    if _ANSWER_PHRASE_RE.search(text):
        parsed = scorers.parse_docmath_answer(text)
        if parsed is None:
            return Rejected(CaseType.DROPPED, "docmath_qa: answer phrase without a number")
        text = parsed
    value = scorers.parse_number(text)
    if value is None:
        return Rejected(CaseType.DROPPED, "docmath_qa: answer is not a single number")
    if value == 0.0:
        return Rejected(CaseType.DROPPED, "docmath_qa: answer is zero")
    return question.strip(), scorers.format_number(value)


def _parse_mc(record: dict[str, Any]) -> tuple[str, str, str] | Rejected:
    question, answer, options = record.get("question"), record.get("answer"), record.get("options")
    if not isinstance(question, str) or not question.strip():
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'question' must be a non-empty string")
    if not isinstance(answer, str):
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'answer' must be a string")
    if not isinstance(options, dict) or not all(k in options for k in MC_LETTERS):
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'options' must be an object with keys A-D")
    letter = answer.strip().strip("().: ")
    if letter not in MC_LETTERS:
        letter = scorers.parse_mc_answer(answer)
    if letter not in MC_LETTERS:
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'answer' must name one of A, B, C, D")
    block = mc_question_block(question.strip(), {k: str(options[k]) for k in MC_LETTERS})
    return block, letter, question.strip()


def mc_question_block(question: str, options: dict[str, str]) -> str:
    """The responder-facing multiple-choice block: intro line, question, `Choices:` and `(A)`-`(D)` lines."""
    lines = [
        "Pick the correct answer to the following question.",
        question,
        "Choices:",
        *(f"({k}) {options[k]}" for k in MC_LETTERS),
    ]
    return "\n".join(lines)


def _parse_general(
    record: dict[str, Any], count_tokens: Callable[[str], int], max_answer_tokens: int
) -> tuple[str, str] | Rejected:
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        return Rejected(
            CaseType.BAD_FORMAT, "doc_general_qa: 'question' must be a non-empty string"
        )
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = json.dumps(answer)  # section 9 item 7: a numeric answer is accepted as text
    if not isinstance(answer, str) or not answer.strip():
        return Rejected(CaseType.BAD_FORMAT, "doc_general_qa: 'answer' must be a non-empty string")
    text = answer.strip()
    if "answer is" in text.lower():
        parsed = scorers.parse_general_answer(text)
        if parsed:
            text = parsed
    try:
        num_tokens = int(count_tokens(text))
    except Exception:  # a broken tokenizer callable must not crash the round
        num_tokens = _whitespace_tokens(text)
    if num_tokens > max_answer_tokens:
        return Rejected(CaseType.DROPPED, f"doc_general_qa: answer over {max_answer_tokens} tokens")
    return question.strip(), text


def parse_questioner(
    task: Task | str,
    text: str,
    *,
    count_tokens: Callable[[str], int] | None = None,
    max_answer_tokens: int = 40,
) -> ParsedQA | Rejected:
    """Parse one questioner completion into a `ParsedQA` or a `Rejected` with its case (spec 1.3).

    `count_tokens` measures the doc_general_qa answer; pass the policy tokenizer's length function. The default
    counts whitespace-separated words, which is only a stand-in for tests.
    """
    try:
        task = Task(task)
    except ValueError:
        return Rejected(CaseType.BAD_FORMAT, f"no parser for task {task!r}")
    if not isinstance(text, str):
        return Rejected(CaseType.BAD_FORMAT, "questioner output is not text")
    body = strip_thinking(text)
    if body == EMPTY:
        return Rejected(CaseType.DROPPED, "thinking block never closed")
    record = extract_json(body)
    if not record:
        return Rejected(CaseType.BAD_FORMAT, "no JSON object found")
    if task is Task.DOCMATH_QA:
        result = _parse_docmath(record)
        if isinstance(result, Rejected):
            return result
        return ParsedQA(task=task, question=result[0], answer=result[1], raw_question=result[0])
    if task is Task.DOC_MC:
        mc = _parse_mc(record)
        if isinstance(mc, Rejected):
            return mc
        return ParsedQA(task=task, question=mc[0], answer=mc[1], raw_question=mc[2])
    general = _parse_general(record, count_tokens or _whitespace_tokens, max_answer_tokens)
    if isinstance(general, Rejected):
        return general
    return ParsedQA(task=task, question=general[0], answer=general[1], raw_question=general[0])


def is_bad_ground(no_context_scores: Sequence[float], threshold: float = 0.1) -> bool:
    """Grounding pre-filter (spec 1.4): True when the question is answerable without its documents.

    The mean rule score of the no-context answers is compared with `threshold` (>= means bad_ground). One
    sample and 0.1 reproduce the reference. An empty sequence (no no-context answer) is not bad_ground.
    """
    if not no_context_scores:
        return False
    return sum(no_context_scores) / len(no_context_scores) >= threshold
