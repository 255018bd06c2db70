"""Each evaluation input format on small hand-written fixtures (not copies of real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_spell.eval.formats import (
    FORMATS,
    detect_format,
    format_number,
    load_all,
    load_examples,
)
from megatron_spell.types import Task

HOTPOT = [
    {
        "_id": "hp1",
        "question": "Which city hosts the Blue Lantern Museum?",
        "answer": "Marrow Bay",
        "type": "bridge",
        "level": "hard",
        "supporting_facts": [["Blue Lantern Museum", 0]],
        "context": [
            [
                "Blue Lantern Museum",
                ["The Blue Lantern Museum is a museum.", " It is in Marrow Bay."],
            ],
            ["Marrow Bay", ["Marrow Bay is a harbour town."]],
        ],
    }
]

LONGBENCH = [
    {
        "input": "Who founded the fictional Kestrel Guild?",
        "context": "Passage 1:\nThe Kestrel Guild was founded by Ada Quill.",
        "answers": ["Ada Quill", "A. Quill"],
        "length": 11,
        "dataset": "hotpotqa_e",
        "language": "en",
        "all_classes": None,
        "_id": "lb1",
    },
    {
        "input": "Where is the guild based?",
        "context": "The guild is based in Fenwick.",
        "answers": ["Fenwick"],
        "dataset": "musique",
        "_id": "lb2",
    },
]

LONGBENCH_V2 = [
    {
        "_id": "v2a",
        "domain": "Single-Document QA",
        "question": "What colour is the invented flag?",
        "choice_A": "Red",
        "choice_B": "Green",
        "choice_C": "Teal",
        "choice_D": "Mauve",
        "answer": "C",
        "context": "The invented flag is teal.",
    }
]

FRAMES = [
    {
        "Unnamed: 0": 3,
        "Prompt": "Which invented river did the poet of Dunmere cross?",
        "Answer": "the Silverrun",
        "wiki_items": [
            {"title": "Dunmere", "text": "Dunmere is the home of the poet Ilsa Varn."},
            {"title": "Ilsa Varn", "text": "Ilsa Varn once crossed the Silverrun."},
        ],
    }
]

DOCMATH = [
    {
        "question_id": "dm-7",
        "source": "invented",
        "paragraphs": ["Revenue was 120 in 2020.", "| year | cost |\n| 2020 | 45 |"],
        "question": "What was the profit in 2020?",
        "ground_truth": 75.0,
    },
    {
        "question_id": "dm-8",
        "paragraphs": ["Growth was 12.5 percent."],
        "question": "Growth?",
        "ground_truth": 12.5,
    },
]

CORPUS = [
    {
        "data_source": "ultrafineweb_doc_general_qa",
        "paragraphs": ["Doc one text.", "Doc two text."],
        "question": "What joins doc one and doc two?",
        "answer": "the text",
        "question_id": "c1",
    },
    {
        "data_source": "docmath_16K",
        "paragraphs": ["A is 3.", "B is 4."],
        "question": "A times B?",
        "answer": 12,
    },
    {
        "data_source": "ultrafineweb_16K",
        "task": "doc_mc",
        "paragraphs": ["Cats purr."],
        "question": "What do cats do?",
        "options": {"A": "bark", "B": "purr", "C": "moo", "D": "quack"},
        "answer": "b",
    },
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("file_name", "write", "rows", "expected"),
    [
        pytest.param(
            "hotpot_dev.json",
            _write_json,
            HOTPOT,
            {
                "id": "hp1",
                "benchmark": "hotpotqa",
                "documents": (
                    "Blue Lantern Museum\nThe Blue Lantern Museum is a museum. It is in Marrow Bay.\n"
                    "Marrow Bay\nMarrow Bay is a harbour town."
                ),
                "question": "Which city hosts the Blue Lantern Museum?",
                "references": ("Marrow Bay",),
            },
            id="hotpotqa_official_json",
        ),
        pytest.param(
            "frames.jsonl",
            _write_jsonl,
            FRAMES,
            {
                "id": "3",
                "benchmark": "frames",
                "documents": (
                    "Dunmere\nDunmere is the home of the poet Ilsa Varn.\n"
                    "Ilsa Varn\nIlsa Varn once crossed the Silverrun."
                ),
                "question": "Which invented river did the poet of Dunmere cross?",
                "references": ("the Silverrun",),
            },
            id="frames",
        ),
    ],
)
def test_one_general_qa_example(tmp_path: Path, file_name, write, rows, expected) -> None:
    """A one-example HotpotQA (official JSON) or FRAMES file: its fields, titles joined into the
    documents."""
    [ex] = load_examples(write(tmp_path / file_name, rows))
    assert ex.task is Task.DOC_GENERAL_QA
    for name, value in expected.items():
        assert getattr(ex, name) == value, name


def test_longbench_jsonl(tmp_path: Path) -> None:
    first, second = load_examples(_write_jsonl(tmp_path / "lb.jsonl", LONGBENCH))
    assert first.benchmark == "hotpotqa"  # LongBench-E's `_e` suffix is dropped
    assert second.benchmark == "musique"
    assert first.task is Task.DOC_GENERAL_QA
    assert first.documents == LONGBENCH[0]["context"]
    assert first.question == "Who founded the fictional Kestrel Guild?"
    assert first.references == ("Ada Quill", "A. Quill")
    assert first.id == "lb1"


def test_longbench_v2_multiple_choice(tmp_path: Path) -> None:
    [ex] = load_examples(_write_json(tmp_path / "lbv2.json", LONGBENCH_V2))
    assert ex.benchmark == "longbench-v2" and ex.task is Task.DOC_MC
    assert ex.references == ("C",)
    # the same block training shows the responder (spell.parsing.mc_question_block)
    assert ex.question == (
        "Pick the correct answer to the following question.\nWhat colour is the invented flag?\n"
        "Choices:\n(A) Red\n(B) Green\n(C) Teal\n(D) Mauve"
    )
    assert ex.documents == "The invented flag is teal."


def test_docmath(tmp_path: Path) -> None:
    a, b = load_examples(_write_jsonl(tmp_path / "complong_testmini.jsonl", DOCMATH))
    assert a.benchmark == "docmath" and a.task is Task.DOCMATH_QA
    assert a.documents == "Revenue was 120 in 2020.\n| year | cost |\n| 2020 | 45 |"
    assert a.references == ("75",) and b.references == ("12.5",)
    assert a.id == "dm-7"


def test_corpus_with_questions(tmp_path: Path) -> None:
    qa, math_, mc = load_examples(_write_jsonl(tmp_path / "corpus.jsonl", CORPUS))
    assert qa.task is Task.DOC_GENERAL_QA and qa.benchmark == "ultrafineweb_doc_general_qa"
    assert qa.documents == "Doc one text.\nDoc two text." and qa.references == ("the text",)
    assert math_.task is Task.DOCMATH_QA and math_.references == ("12",)
    assert math_.id == "corpus-1"  # no id field: file stem and row index
    assert mc.task is Task.DOC_MC and mc.references == ("B",)
    assert mc.question.endswith(
        "What do cats do?\nChoices:\n(A) bark\n(B) purr\n(C) moo\n(D) quack"
    )


def test_json_object_with_data_list(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": DOCMATH}), encoding="utf-8")
    assert [e.id for e in load_examples(path)] == ["dm-7", "dm-8"]


def test_detection_of_every_format() -> None:
    assert detect_format(HOTPOT[0]) == "hotpotqa"
    assert detect_format(LONGBENCH[0]) == "longbench"
    assert detect_format(LONGBENCH_V2[0]) == "longbench_v2"
    assert detect_format(DOCMATH[0]) == "docmath"
    assert detect_format(FRAMES[0]) == "frames"
    assert detect_format(CORPUS[0]) == "corpus"
    # a string context with question/answer is not the HotpotQA format
    assert detect_format({"question": "q", "answer": "a", "context": "text"}) is None


def test_unknown_format_error_names_file_fields_and_formats(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mystery.jsonl", [{"prompt": "x", "label": "y"}])
    with pytest.raises(ValueError) as info:
        load_examples(path)
    message = str(info.value)
    assert "mystery.jsonl" in message
    assert "['label', 'prompt']" in message
    for name in FORMATS:
        assert name in message


def test_forced_format_and_task_override(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "lb.jsonl", LONGBENCH)
    examples = load_examples(path, format="longbench", task="doc_mc", limit=1)
    assert len(examples) == 1 and examples[0].task is Task.DOC_MC
    with pytest.raises(ValueError, match="--format 'nope' is unknown"):
        load_examples(path, format="nope")
    with pytest.raises(ValueError, match="lacks"):
        load_examples(_write_jsonl(tmp_path / "d.jsonl", DOCMATH), format="longbench")


def test_bad_inputs_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_examples(tmp_path / "broken.jsonl")


def test_ids_stay_unique_across_files(tmp_path: Path) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", DOCMATH)
    b = _write_jsonl(tmp_path / "b.jsonl", DOCMATH)
    examples = load_all([a, b])
    keys = [(e.benchmark, e.id) for e in examples]
    assert len(set(keys)) == 4
    assert keys[2] == ("docmath", "dm-7#1")


def test_format_number() -> None:
    assert format_number(75.0) == "75"
    assert format_number(12.5) == "12.5"
    assert format_number(-3) == "-3"
    assert format_number(" 4.0 ") == "4.0"
    assert format_number(1e20) == "1e+20"
