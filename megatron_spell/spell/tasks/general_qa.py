"""The `doc_general_qa` task: a multi-hop factual question with a short free-text answer
(docs/spell-algorithm.md §2, §3.1.1).

Questioner field rules (§1.3, `SPELL/verl/verl/trainer/ppo/ray_spell_trainer.py:933-964`): a
non-empty string `question` and a non-empty `answer`; an answer phrased "... answer is X" is
unwrapped.

Deliberate decisions (D5):

* Numeric answers: the reference penalises a JSON number as bad_format (-1). A number is a perfectly
  good factual answer ("1969"), so we accept int/float answers and store their text; booleans, lists
  and objects stay bad_format.
* Answer length: the prompt asks for a short phrase; answers above `max_answer_tokens` (40 by
  default, counted with the caller's `count_tokens`, normally the model tokenizer) are dropped
  without penalty, as in the reference.
"""

from __future__ import annotations

import json
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

RULES = """Write ONE hard question about the documents.
Principles:
1. Answering must require understanding the documents and chaining facts from ALL of them; no single document
   may contain the answer on its own.
2. Write in English. The question must stand alone: do not refer to "Document 2" or "the text above".
3. There must be exactly one correct, factual answer, with no room for interpretation.
4. Start with a question word (what, which, who, when, where, how many ...) and tie together conditions
   that come from different documents with words such as "and", "while", "after", "whose".
5. The answer is a short phrase of at most 20 tokens.
6. Give a step-by-step derivation that names the document behind each step before the JSON."""

JSON_EXAMPLE = """```json
{"question": "<the question>", "answer": "<the short answer>"}
```"""

# shared with doc_mc (docs/spell-algorithm.md §2.1: the general and MC templates offer the same
# escalation types)
ESCALATION = """Ways to make it harder: compute a quantity from facts in several sources; compare or rank
items across documents; link a condition or a cause in one document to an effect in another; combine different
kinds of data (dates, amounts, names, tables)."""

RESPONDER = responder_template(
    """Read the documents below and answer the question. End your reply with one sentence of the
form "The correct answer is X", where X is a short answer."""
)

SCHEMA = object_schema(
    question=QUESTION_SCHEMA, answer={"type": "string", "minLength": 1, "maxLength": 120}
)

# one answer sentence in the docs/spell-algorithm.md §2.2 form; `parse_prediction` takes what
# follows "answer is"
RESPONDER_PATTERN = r"The correct answer is [^\n]{1,100}"


def parse_questioner(
    record: dict[str, Any], count_tokens: Callable[[str], int], max_answer_tokens: int
) -> ParsedQA | Rejected:
    """Field rules of a doc_general_qa questioner object (module docstring)."""
    question, answer = record.get("question"), record.get("answer")
    if (bad := bad_question("doc_general_qa", question)) is not None:
        return bad
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = json.dumps(answer)  # D5: a numeric answer is accepted as text
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
        num_tokens = len(text.split())
    if num_tokens > max_answer_tokens:
        return Rejected(CaseType.DROPPED, f"doc_general_qa: answer over {max_answer_tokens} tokens")
    q = question.strip()
    return ParsedQA(task=Task.DOC_GENERAL_QA, question=q, answer=text, raw_question=q)


def parse_prediction(text: str) -> str | None:
    """The answer phrase of a response: the last 1000 characters unless a phrase or `</think>` occurs."""
    return scorers.parse_general_answer(scorers.extract_solution(text, 1000))


def parse_reference(reference: str) -> str | None:
    return scorers.unwrap_reference(reference, scorers.parse_general_answer)


def score(prediction: str, reference: str, qa_metric: str) -> float:
    return scorers.qa_metrics(prediction, reference)[qa_metric]


def gold_text(answer: Any) -> str:
    return str(answer).strip()


SPEC = module_spec(
    globals(),
    Task.DOC_GENERAL_QA,
    source_keywords=("general_qa", "frames", "musique", "longbench", "hotpot", "2wiki"),
)
