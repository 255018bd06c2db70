"""Every citation in the code resolves inside the repository (docs/style.md, "Citations").

* every Markdown file that code in megatron_spell/ and tools/ names exists (`docs/x.md` or a bare `x.md`,
  looked up in docs/ and at the repository root);
* every `§N.M` the code cites of docs/spell-algorithm.md is one of its section headings, and every
  `§9 item N` is a row of its §9.1 table;
* every deviation id (`D12`) the code cites is a row of the table in docs/spell-algorithm.md §9.2;
* no undefined abbreviation of the authors' code (`RST 430-455`, `DS 62`, `docqa 204-226`) remains.

Only comments and docstring-like strings are read, with `tokenize` and `ast`.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ALGO = DOCS / "spell-algorithm.md"
CODE_DIRS = ("megatron_spell", "tools")
CITING_DIRS = ("megatron_spell", "tools", "tests")
# files the code writes (run outputs), not documents it cites
OUTPUT_FILES = {"report.md", "results.md"}

_MD_RE = re.compile(r"(?<![\w.:/-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
_SECTION_RE = re.compile(
    r"(?:(?P<doc>[\w/.-]+\.md)\s+)?§(?P<num>\d+(?:\.\d+)*)(?P<item> item \d+)?"
)
_DEVIATION_RE = re.compile(r"(?<![\w-])D(\d+)\b")
_ABBREV_RE = re.compile(
    r"(?<![\w/`.])(?:RST|CA|DS|PR|dp_actor|fsdp_workers)\s+\d+"
    r"|(?<![\w/`.])(?:docqa|long|docmath)\s+\d+-\d+"
)


@functools.cache
def _texts(path: Path) -> list[str]:
    """The comments and docstring-like strings of one Python file."""
    src = path.read_text(encoding="utf-8")
    out = [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(src)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            out.append(node.value.value)
    return out


def _files(dirs: tuple[str, ...]) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


@functools.cache
def _headings(md: Path) -> set[str]:
    found = re.findall(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", md.read_text(encoding="utf-8"), re.MULTILINE)
    return set(found)


def _section_body(md: Path, number: str) -> str:
    text = md.read_text(encoding="utf-8")
    m = re.search(
        rf"^#+\s+{re.escape(number)}\.?\s.*?(?=^#+\s+\d|\Z)", text, re.MULTILINE | re.DOTALL
    )
    assert m, f"{md.name} has no section {number}"
    return m.group(0)


def _table_ids(body: str, pattern: str) -> set[str]:
    return set(re.findall(rf"^\|\s*({pattern})\s*\|", body, re.MULTILINE))


def test_docs_exist():
    for name in ("spell-algorithm.md", "architecture.md", "platform.md", "style.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def cited_markdown_files(dirs: tuple[str, ...] = CODE_DIRS) -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for path in _files(dirs):
        for text in _texts(path):
            for name in _MD_RE.findall(text):
                if Path(name).name not in OUTPUT_FILES:
                    cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return cited


def _resolves(name: str) -> bool:
    if (ROOT / name).is_file():
        return True
    return "/" not in name and ((DOCS / name).is_file() or (ROOT / name).is_file())


def test_cited_markdown_files_exist():
    cited = cited_markdown_files()
    assert cited, "the code cites no Markdown file at all: is the pattern broken?"
    missing = {name: where[:3] for name, where in cited.items() if not _resolves(name)}
    assert not missing, f"cited Markdown files that are not in the repository: {missing}"


def test_cited_sections_and_deviations_exist():
    headings = _headings(ALGO)
    items = _table_ids(_section_body(ALGO, "9.1"), r"\d+")
    deviations = _table_ids(_section_body(ALGO, "9.2"), r"D\d+")
    assert {"1.1", "3.1.2", "9", "9.1", "9.2"} <= headings and items and deviations
    bad: list[str] = []
    for path in _files(CITING_DIRS):
        rel = path.relative_to(ROOT)
        for text in _texts(path):
            for m in _SECTION_RE.finditer(text):
                doc = m.group("doc")
                if doc and Path(doc).name != ALGO.name:
                    other = DOCS / Path(doc).name
                    if other.is_file() and m.group("num") not in _headings(other):
                        bad.append(f"{rel}: {m.group(0)}")
                    continue
                if m.group("num") not in headings:
                    bad.append(f"{rel}: §{m.group('num')}")
                item = m.group("item")
                if item and m.group("num") == "9" and item.split()[-1] not in items:
                    bad.append(f"{rel}: §9{item}")
            for num in _DEVIATION_RE.findall(text):
                if f"D{num}" not in deviations:
                    bad.append(f"{rel}: D{num}")
    assert not bad, "citations of docs/spell-algorithm.md that do not exist:\n" + "\n".join(bad)


def test_no_undefined_reference_abbreviations():
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0)!r}"
        for path in _files(CITING_DIRS)
        for text in _texts(path)
        for m in _ABBREV_RE.finditer(text)
    ]
    assert not found, (
        "cite the authors' code by repository path (docs/spell-algorithm.md, 'Reference code'):\n"
        + "\n".join(found)
    )


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("(docs/spell-algorithm.md §3.1.2)", True),
        ("(docs/spell-algorithm.md §3.9.9)", False),
        ("(§9 item 5)", True),
        ("(§9 item 99)", False),
        ("(D9)", True),
        ("(D999)", False),
    ],
)
def test_the_checks_can_fail(text, ok):
    """The patterns above find what they are meant to find (a check that cannot fail checks nothing)."""
    headings = _headings(ALGO)
    items = _table_ids(_section_body(ALGO, "9.1"), r"\d+")
    deviations = _table_ids(_section_body(ALGO, "9.2"), r"D\d+")
    good = all(
        m.group("num") in headings and (not m.group("item") or m.group("item").split()[-1] in items)
        for m in _SECTION_RE.finditer(text)
    ) and all(f"D{n}" in deviations for n in _DEVIATION_RE.findall(text))
    assert good is ok
    assert bool(_ABBREV_RE.search("see RST 430-455")) and not _ABBREV_RE.search(
        "`SPELL/verl/verl/trainer/ppo/ray_spell_trainer.py:430-455`"
    )
