"""Independent recomputation of the eval table from predictions.jsonl (brute force, no metrics module).

Shared by the unit and e2e report tests: both check that results.md agrees with the per-example JSONL.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path


def brute_pass_at_k(scores: list[float], k: int) -> float:
    """Fraction of k-subsets (without replacement) whose best score is 1; mean max for graded scores."""
    subsets = list(itertools.combinations(scores, k))
    return sum(max(s) for s in subsets) / len(subsets)


def recompute_table(predictions_path: Path, ks: list[int]) -> dict[str, dict[str, float]]:
    """{benchmark or 'overall (macro)'/'overall (micro)': {'questions', 'mean', 'pass@k'...}} in percent."""
    rows = [json.loads(line) for line in predictions_path.read_text().splitlines() if line.strip()]
    groups: dict[str, list[list[float]]] = {}
    for row in rows:
        groups.setdefault(row["benchmark"], []).append(row["scores"])
    table = {}
    for bench, questions in groups.items():
        entry = {"questions": len(questions)}
        entry["mean"] = 100 * sum(sum(q) / len(q) for q in questions) / len(questions)
        for k in ks:
            entry[f"pass@{k}"] = (
                100 * sum(brute_pass_at_k(q, k) for q in questions) / len(questions)
            )
        table[bench] = entry
    keys = ["mean"] + [f"pass@{k}" for k in ks]

    def mean_of(names: list[str]) -> dict[str, float]:
        return {
            "questions": sum(table[b]["questions"] for b in names),
            **{key: sum(table[b][key] for b in names) / len(names) for key in keys},
        }

    benches = list(groups)
    mqa = [b for b in ("2wikimqa", "hotpotqa", "musique") if b in groups]
    if mqa:
        table["LB-MQA (paper)"] = mean_of(mqa)
    cols = [b for b in ("docmath", "frames", "LB-MQA (paper)", "longbench-v2") if b in table]
    if cols:
        table["Avg (paper)"] = mean_of(cols)
    table["overall (macro)"] = mean_of(benches)
    allq = [q for qs in groups.values() for q in qs]
    micro = {"questions": len(allq), "mean": 100 * sum(sum(q) / len(q) for q in allq) / len(allq)}
    for k in ks:
        micro[f"pass@{k}"] = 100 * sum(brute_pass_at_k(q, k) for q in allq) / len(allq)
    table["overall (micro)"] = micro
    return table


def assert_table_matches(table_md: str, predictions_path: Path, ks: list[int], n: int) -> None:
    """Every cell of results.md equals the recomputation, to the table's 2 decimals."""
    from megatron_spell.eval.report import parse_markdown_table

    parsed = parse_markdown_table(table_md)
    expected = recompute_table(predictions_path, ks)
    assert set(parsed) == set(expected), (sorted(parsed), sorted(expected))
    for name, cells in expected.items():
        got = parsed[name]
        assert int(got["questions"]) == cells["questions"], name
        assert abs(float(got[f"mean@{n}"]) - cells["mean"]) <= 0.005 + 1e-9, (name, got)
        for k in ks:
            assert abs(float(got[f"pass@{k}"]) - cells[f"pass@{k}"]) <= 0.005 + 1e-9, (name, k, got)
