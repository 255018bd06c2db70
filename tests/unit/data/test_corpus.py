"""Corpus loading through `datasets` (docs/spell-algorithm.md §7.2): formats, directories, schema
errors, empty documents."""

import functools
import json

import pandas as pd
import pytest

from megatron_spell.data import corpus
from megatron_spell.data.corpus import resolve_files, source_prefix
from megatron_spell.types import DocSet


@pytest.fixture
def load_corpus(tmp_path_factory):
    """`corpus.load_corpus` with a private datasets cache (keeps the tests out of the user's home)."""
    return functools.partial(corpus.load_corpus, cache_dir=tmp_path_factory.mktemp("hf_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_formats_and_directory(load_corpus, tmp_path):
    rows = [
        {"data_source": "docmath_a", "question_id": "m1", "paragraphs": ["p1", "p2"], "extra": 1},
        {"data_source": "ultrafineweb_b", "question_id": "u1", "paragraphs": ["x"]},
    ]
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", rows[:1])
    (tmp_path / "sub" / "b.json").write_text(json.dumps(rows[1:]))
    pd.DataFrame(
        {"data_source": ["docmath_c"], "question_id": [7], "paragraphs": [["q1", "q2", "q3"]]}
    ).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    docs, stats = load_corpus(tmp_path)
    assert docs == [
        DocSet("docmath_a", "m1", ("p1", "p2")),
        DocSet("docmath_c", "7", ("q1", "q2", "q3")),
        DocSet("ultrafineweb_b", "u1", ("x",)),
    ]
    assert (stats.num_files, stats.num_rows, stats.num_docs) == (3, 3, 6)
    same, _ = load_corpus(
        [tmp_path / "a.jsonl", tmp_path / "c.parquet", tmp_path / "sub" / "b.json"]
    )
    assert sorted(same, key=lambda d: d.question_id) == sorted(docs, key=lambda d: d.question_id)


def test_empty_documents_skipped_and_counted(load_corpus, tmp_path):
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [
            {"data_source": "docmath_a", "question_id": "1", "paragraphs": ["", "  ", "ok"]},
            {"data_source": "docmath_a", "question_id": "2", "paragraphs": []},
            {"data_source": "docmath_a", "question_id": "3", "paragraphs": ["\n"]},
        ],
    )
    docs, stats = load_corpus(path)
    assert docs == [DocSet("docmath_a", "1", ("ok",))]
    assert (stats.num_empty_docs, stats.num_empty_rows) == (3, 2)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"data_source": "", "question_id": "1", "paragraphs": ["a"]}, "row 1: data_source"),
        (
            {"data_source": "d_x", "question_id": "1", "paragraphs": "abc"},
            "row 1: paragraphs must be a list",
        ),
        ({"data_source": "d_x", "question_id": "", "paragraphs": ["a"]}, "row 1: question_id"),
    ],
)
def test_schema_errors_name_file_and_row(load_corpus, tmp_path, row, message):
    good = {"data_source": "d_x", "question_id": "0", "paragraphs": ["a"]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=message) as info:
        load_corpus(path)
    assert "bad.jsonl" in str(info.value)


def test_missing_column_and_duplicates(load_corpus, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"data_source": "d_x", "paragraphs": ["a"]}])
    with pytest.raises(ValueError, match=r"m\.jsonl.*question_id"):
        load_corpus(path)
    row = {"data_source": "d_x", "question_id": "1", "paragraphs": ["a"]}
    path = write_jsonl(tmp_path / "dup.jsonl", [row, row])
    with pytest.raises(ValueError, match="duplicate"):
        load_corpus(path)


def test_bad_paths(load_corpus, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_files(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="suffix"):
        resolve_files(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="holds no"):
        resolve_files(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        resolve_files([])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_corpus(tmp_path / "broken.json")


def test_empty_file_is_an_error(load_corpus, tmp_path):
    for name, text in (("zero.jsonl", ""), ("blank.jsonl", "\n  \n"), ("zero.json", "")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=f"corpus file {path} is empty"):
            load_corpus(path)
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.parquet is empty"):
        load_corpus(tmp_path / "zero.parquet")
    (tmp_path / "arr.json").write_text("[]")
    with pytest.raises(ValueError, match="arr.json holds an empty JSON array"):
        load_corpus(tmp_path / "arr.json")


def test_malformed_line_names_its_number(load_corpus, tmp_path):
    good = json.dumps({"data_source": "d_x", "question_id": "0", "paragraphs": ["a"]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good[:-1]}\n{good}\n")  # line 3 lacks its closing brace
    with pytest.raises(ValueError, match=f"corpus file {path}, line 3: not valid JSON"):
        load_corpus(path)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2: a row must be a JSON object, got list"):
        load_corpus(path)


def test_file_without_usable_rows_is_an_error(load_corpus, tmp_path):
    good = write_jsonl(
        tmp_path / "good.jsonl", [{"data_source": "d_x", "question_id": "0", "paragraphs": ["a"]}]
    )
    empty = write_jsonl(
        tmp_path / "hollow.jsonl",
        [{"data_source": "d_x", "question_id": str(i), "paragraphs": ["", " "]} for i in range(3)],
    )
    with pytest.raises(ValueError, match=r"hollow\.jsonl has no usable rows \(3 rows"):
        load_corpus([good, empty])
    pd.DataFrame({"data_source": [], "question_id": [], "paragraphs": []}).to_parquet(
        tmp_path / "none.parquet"
    )
    with pytest.raises(ValueError, match=r"none\.parquet holds no rows"):
        load_corpus(tmp_path / "none.parquet")


def test_source_prefix():
    assert source_prefix("docmath_train_16K") == "docmath"
    assert source_prefix("plain") == "plain"
