"""The `docmath_qa` task: a multi-step numerical question over text and tables
(docs/spell-algorithm.md §2, §3.1.3).

Questioner field rules (§1.3, `SPELL/verl/verl/trainer/ppo/ray_spell_trainer.py:855-886`): a
non-empty string `question` and an `answer` that is a string or a number, else bad_format (-1). An
answer phrased "... answer is N" or `\\boxed{N}` is re-parsed with the response parser; the result
must be a single non-zero number (`scorers.parse_number`), else the sample is DROPPED (no penalty),
as the reference's parser result 0. The stored ground truth is `scorers.format_number` of the value.

Deliberate decision (D4), boolean answers: "True"/"yes" strings and JSON `true`
parse in the reference (`isinstance(True, int)`; `normalize` maps the words to booleans) into a
question with ground truth "True", which only a response that boxes a boolean (or 1) can match, so
in practice it ends as zero_variance (0) after eight responder rollouts. Here every boolean answer,
string or JSON, is DROPPED before any rollout: the prompt asks for one non-zero number, the question
cannot be rewarded, and a penalty-free skip is what the reference's own parser does for `false`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from megatron_spell.spell import scorers
from megatron_spell.spell.tasks import (
    QUESTION_SCHEMA,
    bad_question,
    module_spec,
    object_schema,
    responder_template,
)
from megatron_spell.types import CaseType, ParsedQA, Rejected, Task

RULES = """Write ONE numerical reasoning question about the documents (text and tables).
Principles:
1. Solving it must take at least two arithmetic steps and combine numbers from different parts of the
   documents.
2. Do not ask for plain counting (small counts may appear as an intermediate step), for a single value that can
   be looked up, for heavy outside knowledge, or for several numbers at once; avoid needlessly convoluted wording.
3. Do not state the key numbers in the question; everything must come from the documents, with no made-up data.
4. The answer is ONE number that is not zero. Fix the unit and scale in the question ("in millions of dollars",
   "as a percentage") so that the answer is a bare number.
5. Show the calculation with explicit operations before the JSON."""

JSON_EXAMPLE = """```json
{"question": "<the question>", "answer": <the number>}
```"""

ESCALATION = """Ways to make it harder: a change between periods; a derived ratio or metric; a total over
items selected by a condition; a projection or what-if computed from the given figures."""

RESPONDER = responder_template(
    """Read the documents below and solve the question with careful step-by-step numerical
reasoning. End your reply with one sentence of the form "Therefore, the answer is X", where X is a single
number."""
)

SCHEMA = object_schema(question=QUESTION_SCHEMA, answer={"type": "number"})

RESPONDER_PATTERN = r"Therefore, the answer is -?[0-9]{1,12}(\.[0-9]{1,6})?"

_ANSWER_PHRASE_RE = re.compile(r"answer is|\\boxed\{", re.IGNORECASE)


def parse_questioner(
    record: dict[str, Any], count_tokens: Callable[[str], int], max_answer_tokens: int
) -> ParsedQA | Rejected:
    """Field rules of a docmath_qa questioner object (module docstring)."""
    question, answer = record.get("question"), record.get("answer")
    if (bad := bad_question("docmath_qa", question)) is not None:
        return bad
    if isinstance(answer, bool):
        return Rejected(CaseType.DROPPED, "docmath_qa: a boolean answer is not a number")
    if not isinstance(answer, (str, int, float)):
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
    q = question.strip()
    return ParsedQA(
        task=Task.DOCMATH_QA, question=q, answer=scorers.format_number(value), raw_question=q
    )


def parse_prediction(text: str) -> str | None:
    """The number string of a response: the last 300 characters unless a phrase, box or `</think>` occurs."""
    return scorers.parse_docmath_answer(scorers.extract_solution(text, 300, boxed_trigger=True))


def parse_reference(reference: str) -> str | None:
    return scorers.unwrap_reference(reference, scorers.parse_docmath_answer)


def score(prediction: str, reference: str, qa_metric: str) -> float:
    p, g = scorers.parse_number(prediction), scorers.parse_number(reference)
    if p is None or g is None:
        return 0.0
    return float(scorers.compare_two_numbers(p, g))


gold_text = scorers.format_number

SPEC = module_spec(globals(), Task.DOCMATH_QA, source_keywords=("docmath",))
