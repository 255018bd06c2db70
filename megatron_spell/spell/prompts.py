"""Prompt texts of the three roles (spec sections 2.1, 2.2 and 2.4), written in our own words.

Each function returns one plain user message; the caller renders it with the tokenizer's chat template
(`add_generation_prompt=True`). The structure follows the spec: a persona and design principles, a fenced json
block with the required fields, the documents inside `<text>...</text>` at the end of the questioner prompt, the
"Previous Examples" section of the with-history variants, the answer forms the scorers parse ("The correct answer
is X", "Therefore, the answer is X") and the verifier's final `[[YES]]` / `[[NO]]` decision.

Deliberate decisions (spec section 9):

* Item 1: the reference's doc_mc template keeps a literal `<correct_answer>` placeholder that is never filled.
  `questioner_prompt(..., answer_letter=X)` names the letter the correct option must take, so a caller that draws
  X uniformly with its RNG balances the answer letters; without it the prompt simply asks to vary the position.
* Item 7: the JSON examples are valid JSON (no trailing comma).
* Unknown task names raise ValueError instead of silently falling back to the docmath template.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_spell.types import HistoryEntry, Task

NO_CONTEXT = "Empty"  # documents placeholder of the grounding pre-filter pass (spec 1.4)

_PERSONA = (
    "You are a document-analysis specialist who writes test items for a benchmark of long-document "
    "understanding. You will receive a set of documents."
)
_OUTPUT_RULE = (
    "First reason about the documents and draft your item. Then finish your reply with one JSON object "
    "inside a fenced block that starts with ```json and ends with ```."
)

_GENERAL_RULES = """Write ONE hard question about the documents.
Principles:
1. Answering must require understanding the documents and chaining facts from ALL of them; no single document
   may contain the answer on its own.
2. Write in English. The question must stand alone: do not refer to "Document 2" or "the text above".
3. There must be exactly one correct, factual answer, with no room for interpretation.
4. Start with a question word (what, which, who, when, where, how many ...) and tie together conditions
   that come from different documents with words such as "and", "while", "after", "whose".
5. The answer is a short phrase of at most 20 tokens.
6. Give a step-by-step derivation that names the document behind each step before the JSON."""

_GENERAL_JSON = """```json
{"question": "<the question>", "answer": "<the short answer>"}
```"""

_MATH_RULES = """Write ONE numerical reasoning question about the documents (text and tables).
Principles:
1. Solving it must take at least two arithmetic steps and combine numbers from different parts of the
   documents.
2. Do not ask for plain counting (small counts may appear as an intermediate step), for a single value that can
   be looked up, for heavy outside knowledge, or for several numbers at once; avoid needlessly convoluted wording.
3. Do not state the key numbers in the question; everything must come from the documents, with no made-up data.
4. The answer is ONE number that is not zero. Fix the unit and scale in the question ("in millions of dollars",
   "as a percentage") so that the answer is a bare number.
5. Show the calculation with explicit operations before the JSON."""

_MATH_JSON = """```json
{"question": "<the question>", "answer": <the number>}
```"""

_MC_RULES = """Write ONE multiple-choice question with four options about the documents.
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

_MC_JSON = """```json
{"question": "<the question>", "options": {"A": "...", "B": "...", "C": "...", "D": "..."}, "answer": "<A, B, C or D>"}
```"""

_ESCALATE_QA = """Ways to make it harder: compute a quantity from facts in several sources; compare or rank
items across documents; link a condition or a cause in one document to an effect in another; combine different
kinds of data (dates, amounts, names, tables)."""

_ESCALATE_MATH = """Ways to make it harder: a change between periods; a derived ratio or metric; a total over
items selected by a condition; a projection or what-if computed from the given figures."""


def _as_task(task: Task | str) -> Task:
    try:
        return Task(task)
    except ValueError:
        valid = ", ".join(t.value for t in Task)
        raise ValueError(f"unknown task {task!r}: expected one of {valid}") from None


def _history_block(history: Sequence[HistoryEntry | tuple[str, str]]) -> str:
    blocks = []
    for i, item in enumerate(history, start=1):
        question, answer = (item.question, item.answer) if isinstance(item, HistoryEntry) else item
        blocks.append(f"### Example {i}:\nQuestion: {question}\nAnswer: {answer}")
    return "\n\n".join(blocks)


def _task_rules(task: Task, answer_letter: str | None) -> tuple[str, str, str]:
    if task is Task.DOC_GENERAL_QA:
        return _GENERAL_RULES, _GENERAL_JSON, _ESCALATE_QA
    if task is Task.DOCMATH_QA:
        return _MATH_RULES, _MATH_JSON, _ESCALATE_MATH
    if answer_letter is not None:
        if answer_letter not in ("A", "B", "C", "D"):
            raise ValueError(f"answer_letter={answer_letter!r}: expected one of A, B, C, D")
        letter_rule = f"The correct option must be option {answer_letter}."
    else:
        letter_rule = (
            "Place the correct option at any of the four positions; do not favour one letter."
        )
    return _MC_RULES.format(letter_rule=letter_rule), _MC_JSON, _ESCALATE_QA


def questioner_prompt(
    task: Task | str,
    documents: Sequence[str],
    history: Sequence[HistoryEntry | tuple[str, str]] = (),
    *,
    answer_letter: str | None = None,
) -> str:
    """The questioner's user message for `task` over `documents` (already chosen and ordered).

    With a non-empty `history` (entries or (question, answer) pairs, spec 4.1) the with-history variant is
    used: it lists the earlier questions as examples and asks for a new, clearly harder one.
    """
    task = _as_task(task)
    rules, json_example, escalate = _task_rules(task, answer_letter)
    context = "\n".join(documents)
    parts = [_PERSONA, rules]
    if history:
        parts.append(
            "You will also see questions written earlier for these documents. Write ONE new question that is "
            "clearly harder than every example and differs from them in what it asks.\n" + escalate
        )
    parts += [_OUTPUT_RULE + "\n" + json_example, f"<text>\n{context}\n</text>"]
    if history:
        parts.append("Previous Examples:\n\n" + _history_block(history))
    return "\n\n".join(parts)


_RESPONDER_MATH = """Read the documents below and solve the question with careful step-by-step numerical
reasoning. End your reply with one sentence of the form "Therefore, the answer is X", where X is a single
number.

<text>
{documents}
</text>

Question: {question}"""

_RESPONDER_MC = """Read the documents below and answer the multiple-choice question that follows. End your
reply with one sentence of the form "The correct answer is X", where X is the letter of the correct option.

<text>
{documents}
</text>

{question}"""

_RESPONDER_QA = """Read the documents below and answer the question. End your reply with one sentence of the
form "The correct answer is X", where X is a short answer.

<text>
{documents}
</text>

Question: {question}"""

_RESPONDER = {
    Task.DOCMATH_QA: _RESPONDER_MATH,
    Task.DOC_MC: _RESPONDER_MC,
    Task.DOC_GENERAL_QA: _RESPONDER_QA,
}


def responder_prompt(task: Task | str, documents: str, question: str) -> str:
    """The responder's user message: all documents (joined by the caller) and the question.

    Pass `NO_CONTEXT` as `documents` for the grounding pre-filter pass (spec 1.4).
    """
    return _RESPONDER[_as_task(task)].format(documents=documents, question=question)


_VERIFIER = """Your job is to decide whether two answers to the same problem say the same thing. Do not
solve the problem yourself; only compare the two answers.

Treat answers as equivalent when they mean the same even if they are written differently (other units,
notation, word order or wording). For numbers, accept a relative difference of up to 0.15%.

Problem: {question}

Answer 1: {prediction}

Answer 2: {reference}

Explain your comparison briefly, then give your decision on the last line as exactly [[YES]] if the answers
are equivalent or [[NO]] if they are not."""


def verifier_prompt(question: str, prediction: str, reference: str) -> str:
    """The verifier's user message: the question, the parsed prediction (Answer 1) and reference (Answer 2)."""
    return _VERIFIER.format(question=question, prediction=prediction, reference=reference)
