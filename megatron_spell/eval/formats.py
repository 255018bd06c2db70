"""Evaluation input formats: load benchmark files into typed `EvalExample` records
(docs/spell-algorithm.md §8.1).

Supported formats (detected from the fields of the first record, or forced with `format=`):

| format         | fields used                                              | task            |
|----------------|----------------------------------------------------------|-----------------|
| `hotpotqa`     | official dev JSON: `question`, `answer`, `context` as     | doc_general_qa  |
|                | [title, [sentences]] pairs (`_id`)                        |                 |
| `frames`       | `Prompt`, `Answer`, `wiki_items` ({title, text} items)     | doc_general_qa  |
| `longbench`    | LongBench / LongBench-E JSONL: `input`, `context`,        | doc_general_qa  |
|                | `answers` (`dataset`, `_id`)                              |                 |
| `longbench_v2` | `question`, `choice_A`..`choice_D`, `answer` (a letter),  | doc_mc          |
|                | `context` (`_id`)                                         |                 |
| `docmath`      | DocMath-Eval: `paragraphs`, `question`, numeric           | docmath_qa      |
|                | `ground_truth` (`question_id`)                            |                 |
| `corpus`       | our corpus rows with questions: `paragraphs`, `question`, | from            |
|                | `answer` (`data_source`, optional `task`, `options`)      | `data_source`   |

Files may be a JSON array, a JSON object holding a list under `data`, or JSONL (one object per line).

Context rendering follows the reference's `SPELL/eval/generate.py` (§8.1): DocMath paragraphs and
corpus paragraphs are joined by a newline; Frames items are title, newline, text, joined by a
newline; LongBench contexts are used as given. The official HotpotQA dev file is not in the
reference (it uses LongBench-E's hotpotqa); its paragraphs are rendered like the reference's Frames items
(title, newline, the sentences concatenated), joined by a newline.

Deliberate deviations:
* All gold answers are kept (LongBench's `answers` list); the protocol scores a prediction against each and
  takes the best, as LongBench's own metric does. The reference uses `answers[0]` only.
* Multiple-choice questions (LongBench-v2, corpus rows with `options`) use the same block as training
  (`spell.tasks.mc.mc_question_block`: intro line, question, `Choices:`, unindented `(A)`-`(D)` lines); the
  reference's eval block indents its choice lines, unlike its training block (§9 item 17).
* A corpus row's task comes from an explicit `task` field (or `--task`) when present, otherwise from
  `data_source` with the training scorer dispatch (`spell.tasks.for_data_source`, §3.1: doc_mc /
  longbench_v2 -> doc_mc; general_qa / frames / musique / longbench / hotpot / 2wiki -> doc_general_qa;
  docmath -> docmath_qa). A name that routes nowhere is an error naming the record, not a silent default.
  The gold answer is rendered by the task record (`TaskSpec.gold_text`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_spell.spell import tasks
from megatron_spell.spell.scorers import MC_LETTERS, format_number
from megatron_spell.spell.tasks.mc import mc_question_block
from megatron_spell.types import Task

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "EvalExample",
    "format_mc_question",
    "format_number",
    "load_all",
    "load_examples",
]


@dataclass(frozen=True)
class EvalExample:
    """One evaluation question.

    `question` is what follows the documents in the responder prompt; for multiple choice it already holds the
    choices block. `references` are the bare gold answers (an MC letter, a number as text, or answer phrases).
    """

    id: str
    benchmark: str
    task: Task
    documents: str
    question: str
    references: tuple[str, ...]


def format_mc_question(question: str, options: dict[str, str]) -> str:
    """The multiple-choice block exactly as training shows it to the responder (`spell.parsing`)."""
    return mc_question_block(question.strip(), {k: str(options[k]).strip() for k in MC_LETTERS})


def _str_id(row: dict, keys: tuple[str, ...], fallback: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return fallback


def _titled_qa(
    example_id: str, benchmark: str, paragraphs: list[str], question: Any, answer: Any
) -> EvalExample:
    """A doc_general_qa example over titled paragraphs, with one gold answer (HotpotQA, FRAMES)."""
    return EvalExample(
        id=example_id,
        benchmark=benchmark,
        task=Task.DOC_GENERAL_QA,
        documents="\n".join(paragraphs),
        question=str(question).strip(),
        references=(str(answer).strip(),),
    )


def _hotpotqa(row: dict, index: int, stem: str) -> EvalExample:
    paragraphs = []
    for pair in row["context"]:
        title, sentences = pair[0], pair[1]
        text = "".join(sentences) if isinstance(sentences, list) else str(sentences)
        paragraphs.append(f"{title}\n{text.strip()}")
    example_id = _str_id(row, ("_id", "id"), f"{stem}-{index}")
    return _titled_qa(example_id, "hotpotqa", paragraphs, row["question"], row["answer"])


def _frames(row: dict, index: int, stem: str) -> EvalExample:
    items = []
    for item in row["wiki_items"]:
        title, text = (
            (item.get("title", ""), item.get("text", "")) if isinstance(item, dict) else item
        )
        items.append(f"{title}\n{text}")
    example_id = _str_id(row, ("_id", "id", "Unnamed: 0"), f"{stem}-{index}")
    return _titled_qa(example_id, "frames", items, row["Prompt"], row["Answer"])


def _longbench(row: dict, index: int, stem: str) -> EvalExample:
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    dataset = str(row.get("dataset") or stem)
    benchmark = dataset[:-2] if dataset.endswith("_e") else dataset
    return EvalExample(
        id=_str_id(row, ("_id", "id"), f"{stem}-{index}"),
        benchmark=benchmark,
        task=Task.DOC_GENERAL_QA,
        documents=str(row["context"]),
        question=str(row["input"]).strip(),
        references=tuple(str(a).strip() for a in answers),
    )


def _longbench_v2(row: dict, index: int, stem: str) -> EvalExample:
    options = {letter: row[f"choice_{letter}"] for letter in MC_LETTERS}
    return EvalExample(
        id=_str_id(row, ("_id", "id"), f"{stem}-{index}"),
        benchmark="longbench-v2",
        task=Task.DOC_MC,
        documents=str(row["context"]),
        question=format_mc_question(str(row["question"]), options),
        references=(str(row["answer"]).strip().upper(),),
    )


def _docmath(row: dict, index: int, stem: str) -> EvalExample:
    return EvalExample(
        id=_str_id(row, ("question_id", "id", "_id"), f"{stem}-{index}"),
        benchmark="docmath",
        task=Task.DOCMATH_QA,
        documents="\n".join(str(p) for p in row["paragraphs"]),
        question=str(row["question"]).strip(),
        references=(format_number(row["ground_truth"]),),
    )


def _mc_options(row: dict) -> dict | None:
    options = row.get("options")
    return options if isinstance(options, dict) and all(k in options for k in MC_LETTERS) else None


def _corpus_task(row: dict, index: int, data_source: str) -> Task | str:
    if _mc_options(row) is not None:
        return Task.DOC_MC
    if row.get("task"):
        return tasks.get(row["task"]).task
    try:
        return tasks.for_data_source(data_source).task
    except ValueError as err:
        raise ValueError(
            f"record {index}: {err}; add a 'task' field to the record or pass --task"
        ) from None


def _corpus(row: dict, index: int, stem: str) -> EvalExample:
    data_source = str(row.get("data_source") or stem)
    task = _corpus_task(row, index, data_source)
    question = str(row["question"]).strip()
    options = _mc_options(row)
    if options is not None:
        question = format_mc_question(question, options)
    reference = tasks.get(task).gold_text(row["answer"])
    paragraphs = row["paragraphs"]
    documents = paragraphs if isinstance(paragraphs, str) else "\n".join(str(p) for p in paragraphs)
    return EvalExample(
        id=_str_id(row, ("question_id", "id", "_id"), f"{stem}-{index}"),
        benchmark=data_source,
        task=task,
        documents=documents,
        question=question,
        references=(reference,),
    )


@dataclass(frozen=True)
class _Format:
    required: tuple[str, ...]
    build: Callable[[dict, int, str], EvalExample]


# Detection order matters: the more specific field sets come first.
FORMATS: dict[str, _Format] = {
    "longbench_v2": _Format(
        ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context"),
        _longbench_v2,
    ),
    "hotpotqa": _Format(("question", "answer", "context"), _hotpotqa),
    "frames": _Format(("Prompt", "Answer", "wiki_items"), _frames),
    "longbench": _Format(("input", "context", "answers"), _longbench),
    "docmath": _Format(("paragraphs", "question", "ground_truth"), _docmath),
    "corpus": _Format(("paragraphs", "question", "answer"), _corpus),
}


def detect_format(row: dict) -> str | None:
    """Return the name of the first format whose required fields the row has, or None."""
    for name, fmt in FORMATS.items():
        if all(key in row for key in fmt.required):
            if name == "hotpotqa" and not isinstance(row["context"], list):
                continue
            return name
    return None


def _supported() -> str:
    return "; ".join(f"{name} ({', '.join(fmt.required)})" for name, fmt in FORMATS.items())


def read_records(path: Path) -> list[dict]:
    """Read a JSON array, a JSON object with a `data` list, or JSONL into a list of dicts."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: the file is empty; expected JSON or JSONL records")
    if stripped[0] == "[" or (stripped[0] == "{" and path.suffix == ".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); use a JSON array or JSONL") from err
        if isinstance(data, dict):
            data = data.get("data", [data])
        rows = list(data)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({err})") from err
    bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
    if bad:
        raise ValueError(
            f"{path}: record {bad[0]} is not a JSON object; expected one object per record"
        )
    return rows


def load_examples(
    path: str | Path,
    *,
    format: str | None = None,
    task: Task | str | None = None,
    limit: int | None = None,
) -> list[EvalExample]:
    """Load one benchmark file into `EvalExample` records.

    `format` forces a format (see `FORMATS`); otherwise it is detected from the first record's fields.
    `task` overrides the task of every example. `limit` keeps the first `limit` records.
    Raises ValueError naming the file, the fields found and the supported formats when nothing matches.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    if format is not None and format not in FORMATS:
        raise ValueError(f"--format {format!r} is unknown; supported formats: {', '.join(FORMATS)}")
    rows = read_records(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return []
    name = format or detect_format(rows[0])
    if name is None:
        raise ValueError(
            f"{path}: unknown evaluation format; fields found: {sorted(rows[0])}. "
            f"Supported formats (required fields): {_supported()}. Pass --format to force one."
        )
    fmt = FORMATS[name]
    examples = []
    for index, row in enumerate(rows):
        missing = [key for key in fmt.required if key not in row]
        if missing:
            raise ValueError(f"{path}: record {index} lacks {missing} required by format {name!r}")
        if task is not None and name == "corpus":
            row = {**row, "task": tasks.get(task).name}  # the forced task also routes the row
        example = fmt.build(row, index, path.stem)
        if task is not None:
            example = _with_task(example, tasks.get(task).task)
        examples.append(example)
    logger.info("loaded %d examples from %s (format %s)", len(examples), path, name)
    return _dedupe_ids(examples)


def _with_task(example: EvalExample, task: Task) -> EvalExample:
    return EvalExample(
        id=example.id,
        benchmark=example.benchmark,
        task=task,
        documents=example.documents,
        question=example.question,
        references=example.references,
    )


def _dedupe_ids(examples: Iterable[EvalExample]) -> list[EvalExample]:
    """Make (benchmark, id) unique by suffixing repeats with `#k` (grouping keys must be unique)."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for ex in examples:
        key = (ex.benchmark, ex.id)
        count = seen.get(key, 0)
        seen[key] = count + 1
        if count:
            logger.warning(
                "duplicate id %s in %s; renamed to %s#%d", ex.id, ex.benchmark, ex.id, count
            )
            ex = EvalExample(
                f"{ex.id}#{count}", ex.benchmark, ex.task, ex.documents, ex.question, ex.references
            )
        out.append(ex)
    return out


def load_all(
    paths: Iterable[str | Path],
    *,
    format: str | None = None,
    task: Task | str | None = None,
    limit: int | None = None,
) -> list[EvalExample]:
    """Load several files; (benchmark, id) stays unique across them."""
    examples: list[EvalExample] = []
    for path in paths:
        examples += load_examples(path, format=format, task=task, limit=limit)
    return _dedupe_ids(examples)
