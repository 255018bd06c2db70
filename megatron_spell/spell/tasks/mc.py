"""The `doc_mc` task: a four-option multiple-choice question answered by its letter
(docs/spell-algorithm.md §2, §3.1.2).

Questioner field rules (§1.3, `SPELL/verl/verl/trainer/ppo/ray_spell_trainer.py:888-931`): a
string `question`, a string `answer` and `options`, an object with keys A-D; otherwise bad_format.
The answer is re-parsed with the response parser (`scorers.parse_mc_answer`, so "The answer is (B)"
gives B) and must then be exactly one of A, B, C, D, as in the reference: "(A)", "A." or " A" are
bad_format (-1).

The responder sees `mc_question_block`: an intro line, the question, a `Choices:` line and
`(A)`-`(D)` lines.

Deliberate decision (D1): the reference's doc_mc template keeps a literal
`<correct_answer>` placeholder that is never filled. `questioner_prompt(..., answer_letter=X)` names
the letter the correct option must take, so a caller that draws X uniformly with its RNG balances
the answer letters; without it the prompt simply asks to vary the position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_spell.spell import scorers
from megatron_spell.spell.scorers import MC_LETTERS
from megatron_spell.spell.tasks import (
    QUESTION_SCHEMA,
    bad_question,
    general_qa,
    module_spec,
    object_schema,
    responder_template,
)
from megatron_spell.types import CaseType, ParsedQA, Rejected, Task

# the general and MC templates offer the same escalation types (docs/spell-algorithm.md §2.1)
ESCALATION = general_qa.ESCALATION

RULES = """Write ONE multiple-choice question with four options about the documents.
Principles:
1. Solving it must take at least three reasoning steps, use at least three separate facts or figures, and
   mix quantitative with qualitative information.
2. The three wrong options must be believable, each must come from a different mistake, and at least one must
   come from misunderstanding a concept.
3. Avoid plain counting, single look-ups, heavy outside knowledge, several answers, ethical or subjective
   questions and vague options; everything must come from the documents.
4. {letter_rule}
5. Explain why the correct option is right and why each other option is wrong before the JSON.
6. Put only the question in "question"; the options go in "options"."""

JSON_EXAMPLE = """```json
{"question": "<the question>", "options": {"A": "...", "B": "...", "C": "...", "D": "..."}, "answer": "<A, B, C or D>"}
```"""

RESPONDER = responder_template(
    """Read the documents below and answer the multiple-choice question that follows. End your
reply with one sentence of the form "The correct answer is X", where X is the letter of the correct option.""",
    question="{question}",
)

SCHEMA = object_schema(
    question=QUESTION_SCHEMA,
    options=object_schema(
        **{k: {"type": "string", "minLength": 1, "maxLength": 200} for k in "ABCD"}
    ),
    answer={"type": "string", "enum": list("ABCD")},
)

# one answer sentence in the docs/spell-algorithm.md §2.2 form, matched by the reference's `correct
# answer is ([A-D])`
RESPONDER_PATTERN = r"The correct answer is [ABCD]"


def questioner_rules(answer_letter: str | None) -> str:
    """The MC rules; `answer_letter` (if given) is the letter the correct option must take."""
    if answer_letter is not None:
        if answer_letter not in MC_LETTERS:
            raise ValueError(f"answer_letter={answer_letter!r}: expected one of A, B, C, D")
        letter_rule = f"The correct option must be option {answer_letter}."
    else:
        letter_rule = (
            "Place the correct option at any of the four positions; do not favour one letter."
        )
    return RULES.format(letter_rule=letter_rule)


def mc_question_block(question: str, options: dict[str, str]) -> str:
    """The responder-facing multiple-choice block: intro line, question, `Choices:` and `(A)`-`(D)` lines."""
    lines = [
        "Pick the correct answer to the following question.",
        question,
        "Choices:",
        *(f"({k}) {options[k]}" for k in MC_LETTERS),
    ]
    return "\n".join(lines)


def parse_questioner(
    record: dict[str, Any], count_tokens: Callable[[str], int], max_answer_tokens: int
) -> ParsedQA | Rejected:
    """Field rules of a doc_mc questioner object (module docstring)."""
    question, answer, options = record.get("question"), record.get("answer"), record.get("options")
    if (bad := bad_question("doc_mc", question)) is not None:
        return bad
    if not isinstance(answer, str):
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'answer' must be a string")
    if not isinstance(options, dict) or not all(k in options for k in MC_LETTERS):
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'options' must be an object with keys A-D")
    letter = scorers.parse_mc_answer(answer) or answer
    if letter not in MC_LETTERS:
        return Rejected(CaseType.BAD_FORMAT, "doc_mc: 'answer' must be one of A, B, C, D")
    q = question.strip()
    block = mc_question_block(q, {k: str(options[k]) for k in MC_LETTERS})
    return ParsedQA(task=Task.DOC_MC, question=block, answer=letter, raw_question=q)


def parse_prediction(text: str) -> str | None:
    """The letter of a response: the last 300 characters unless "answer is" or `</think>` occurs."""
    return scorers.parse_mc_answer(scorers.extract_solution(text, 300))


def parse_reference(reference: str) -> str | None:
    """A bare letter (also "(B)" or "B." in a dataset), else the letter of an answer sentence."""
    bare = reference.strip().strip("().")
    return bare if bare in MC_LETTERS else scorers.parse_mc_answer(reference)


def score(prediction: str, reference: str, qa_metric: str) -> float:
    return float(prediction == reference)


def gold_text(answer: Any) -> str:
    return str(answer).strip().upper()


SPEC = module_spec(
    globals(), Task.DOC_MC, source_keywords=("doc_mc", "longbench_v2", "longbench-v2")
)
