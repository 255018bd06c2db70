"""Corpus loading: document sets from parquet, JSONL or JSON files (docs/spell-algorithm.md §7.2).

Each row needs `data_source` (str; the text before its first "_" selects the task split and `n_docs`),
`question_id` (str or int; the history-memory key) and `paragraphs` (a list of document strings). Other
columns are ignored. Files are read with the `datasets` library ("parquet" or "json" builder by suffix:
.parquet, .jsonl, .json; a JSON file may hold one array of rows or one object per line). A path may be a
file, a directory (all such files inside, sorted, recursively) or a list of them.

Schema errors are ValueErrors that name the file, the row and the field; an empty file, a JSON
line that does not parse (with its line number) and a file without one usable row are errors too.
Empty or whitespace-only documents are skipped and counted (`CorpusStats.num_empty_docs`); a row
left without documents is skipped and counted (`num_empty_rows`). Duplicate (data_source,
question_id) pairs are an error, since the history memory is keyed by them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_spell.types import DocSet

logger = logging.getLogger(__name__)
SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
REQUIRED = ("data_source", "question_id", "paragraphs")


@dataclass(frozen=True)
class CorpusStats:
    """Counts of one load: files, rows kept, rows and documents skipped as empty."""

    num_files: int
    num_rows: int
    num_docs: int
    num_empty_docs: int
    num_empty_rows: int


def resolve_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into the sorted list of corpus files; errors name the bad path."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise ValueError(
                    f"data.paths: directory {path} holds no {', '.join(SUFFIXES)} files"
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(
                    f"data.paths: {path} has suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
                )
            files.append(path)
        else:
            raise ValueError(
                f"data.paths: {path} does not exist; fix the path (files or directories of "
                f"{', '.join(SUFFIXES)} files)"
            )
    if not files:
        raise ValueError(
            "data.paths is empty: give at least one parquet/JSONL/JSON file or directory"
        )
    return files


def _read_rows(path: Path, cache_dir: str | None) -> list[dict[str, Any]]:
    import datasets  # imported lazily: it is heavy and only data loading needs it

    if path.stat().st_size == 0:
        raise ValueError(f"data.paths: corpus file {path} is empty (0 bytes)")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(
            SUFFIXES[path.suffix],
            data_files=str(path),
            split="train",
            keep_in_memory=True,
            cache_dir=cache_dir,
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        if SUFFIXES[path.suffix] == "json":
            _diagnose_json(path)  # names the line when it can
        elif _parquet_rows(path) == 0:
            raise ValueError(f"data.paths: corpus file {path} holds no rows") from exc
        raise ValueError(f"data.paths: corpus file {path} could not be read: {exc!r}") from exc
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"corpus file {path}: missing column(s) {missing}; every row needs {list(REQUIRED)}"
        )
    return ds.select_columns(list(REQUIRED)).to_list()


def _parquet_rows(path: Path) -> int | None:
    """Row count from a parquet file's footer (None: not parquet); `datasets` fails on 0 rows."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - not a parquet file: the caller reports the datasets error
        return None


def _diagnose_json(path: Path) -> None:
    """Raise the precise error of a JSON/JSONL file `datasets` failed to read (its line number)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"data.paths: corpus file {path} is empty (whitespace only)")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        if not whole:
            raise ValueError(f"data.paths: corpus file {path} holds an empty JSON array (no rows)")
        for i, row in enumerate(whole):
            if not isinstance(row, dict):
                raise ValueError(
                    f"data.paths: corpus file {path}, row {i}: a row must be a JSON object, got "
                    f"{type(row).__name__}"
                )
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"data.paths: corpus file {path}, line {n}: not valid JSON ({exc.msg} at column "
                f"{exc.colno}); every line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"data.paths: corpus file {path}, line {n}: a row must be a JSON object, got "
                f"{type(row).__name__}"
            )


def _row_to_docset(row: dict[str, Any], path: Path, index: int) -> tuple[DocSet | None, int]:
    where = f"corpus file {path}, row {index}"
    source, qid, paragraphs = row["data_source"], row["question_id"], row["paragraphs"]
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: data_source must be a non-empty string, got {source!r}")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        raise ValueError(f"{where}: question_id must be a string or integer, got {qid!r}")
    if not isinstance(paragraphs, (list, tuple)):
        raise ValueError(
            f"{where}: paragraphs must be a list of strings, got {type(paragraphs).__name__}"
        )
    docs, empty = [], 0
    for j, doc in enumerate(paragraphs):
        if doc is None or (isinstance(doc, str) and not doc.strip()):
            empty += 1
        elif isinstance(doc, str):
            docs.append(doc)
        else:
            raise ValueError(f"{where}: paragraphs[{j}] must be a string, got {type(doc).__name__}")
    if not docs:
        return None, empty
    return DocSet(data_source=source, question_id=str(qid), paragraphs=tuple(docs)), empty


def load_corpus(
    paths: str | Path | Sequence[str | Path], *, cache_dir: str | Path | None = None
) -> tuple[list[DocSet], CorpusStats]:
    """Load every row of every corpus file, in file order then row order (see module docstring).

    `cache_dir` is the `datasets` cache (default: its usual ~/.cache/huggingface/datasets).
    """
    files = resolve_files(paths)
    rows: list[DocSet] = []
    seen: dict[tuple[str, str], str] = {}
    empty_docs = empty_rows = 0
    for path in files:
        rows_of_file = _read_rows(path, None if cache_dir is None else str(cache_dir))
        kept = 0
        for index, row in enumerate(rows_of_file):
            docset, empty = _row_to_docset(row, path, index)
            empty_docs += empty
            if docset is None:
                empty_rows += 1
                continue
            key = (docset.data_source, docset.question_id)
            where = f"{path} row {index}"
            if key in seen:
                raise ValueError(
                    f"corpus {where}: duplicate (data_source, question_id) {key}, first seen at "
                    f"{seen[key]}; question ids must be unique per source"
                )
            seen[key] = where
            rows.append(docset)
            kept += 1
        if not kept:
            raise ValueError(
                f"data.paths: corpus file {path} has no usable rows ({len(rows_of_file)} rows, "
                "none with a non-empty document); fill its paragraphs or drop the file"
            )
    stats = CorpusStats(
        num_files=len(files),
        num_rows=len(rows),
        num_docs=sum(len(r.paragraphs) for r in rows),
        num_empty_docs=empty_docs,
        num_empty_rows=empty_rows,
    )
    if empty_docs or empty_rows:
        logger.warning(
            "corpus: skipped %d empty documents and %d rows without documents",
            empty_docs,
            empty_rows,
        )
    return rows, stats


def source_prefix(data_source: str) -> str:
    """The part of a data_source before its first "_" (selects tasks and n_docs)."""
    return data_source.split("_", 1)[0]
