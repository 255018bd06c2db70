"""Prompts of the three roles (docs/spell-algorithm.md §2.1, §2.2 and §2.4), written in our own
words.

The per-task texts (questioner rules, JSON example, escalation types, responder template) live in
the task records (spell/tasks/); this module assembles them and holds the shared questioner frame
and the verifier template. Each function returns one plain user message; the caller renders it with
the tokenizer's chat template (`add_generation_prompt=True`). The structure follows §2: a
persona and design principles, a fenced json block with the required fields, the documents inside
`<text>...</text>` at the end of the questioner prompt, the "Previous Examples" section of the
with-history variants, the answer forms the scorers parse ("The correct answer is X", "Therefore,
the answer is X") and the verifier's final `[[YES]]` / `[[NO]]` decision.

Deliberate decisions (§9):

* D1: the reference's doc_mc template keeps a literal `<correct_answer>` placeholder that is
  never filled; `questioner_prompt(..., answer_letter=X)` names the letter instead
  (spell/tasks/mc.py).
* D5: the JSON examples are valid JSON (no trailing comma).
* Unknown task names raise ValueError instead of silently falling back to the docmath template.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_spell.spell import tasks
from megatron_spell.types import HistoryEntry, Task

NO_CONTEXT = "Empty"  # documents placeholder of the grounding pre-filter pass (§1.4)

_PERSONA = (
    "You are a document-analysis specialist who writes test items for a benchmark of long-document "
    "understanding. You will receive a set of documents."
)
_OUTPUT_RULE = (
    "First reason about the documents and draft your item. Then finish your reply with one JSON object "
    "inside a fenced block that starts with ```json and ends with ```."
)


def _history_block(history: Sequence[HistoryEntry | tuple[str, str]]) -> str:
    blocks = []
    for i, item in enumerate(history, start=1):
        question, answer = (item.question, item.answer) if isinstance(item, HistoryEntry) else item
        blocks.append(f"### Example {i}:\nQuestion: {question}\nAnswer: {answer}")
    return "\n\n".join(blocks)


def questioner_prompt(
    task: Task | str,
    documents: Sequence[str],
    history: Sequence[HistoryEntry | tuple[str, str]] = (),
    *,
    answer_letter: str | None = None,
) -> str:
    """The questioner's user message for `task` over `documents` (already chosen and ordered).

    With a non-empty `history` (entries or (question, answer) pairs, docs/spell-algorithm.md §4.1)
    the with-history variant is used: it lists the earlier questions as examples and asks for a new,
    clearly harder one.
    """
    spec = tasks.get(task)
    context = "\n".join(documents)
    parts = [_PERSONA, spec.questioner_rules(answer_letter)]
    if history:
        parts.append(
            "You will also see questions written earlier for these documents. Write ONE new question that is "
            "clearly harder than every example and differs from them in what it asks.\n"
            + spec.escalation
        )
    parts += [_OUTPUT_RULE + "\n" + spec.questioner_json, f"<text>\n{context}\n</text>"]
    if history:
        parts.append("Previous Examples:\n\n" + _history_block(history))
    return "\n\n".join(parts)


def responder_prompt(task: Task | str, documents: str, question: str) -> str:
    """The responder's user message: all documents (joined by the caller) and the question.

    Pass `NO_CONTEXT` as `documents` for the grounding pre-filter pass (docs/spell-algorithm.md
    §1.4).
    """
    return tasks.get(task).responder_template.format(documents=documents, question=question)


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
