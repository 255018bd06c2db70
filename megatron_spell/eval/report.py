"""Evaluation outputs: per-example predictions JSONL, metrics JSON, a markdown table and a pass@k PNG.

Layout of the output directory (docs/spell-algorithm.md §8.3 for the numbers):
* `predictions.jsonl`: one line per question with its samples, rule/judge/final scores, mean@n and pass@k;
* `metrics.json`: the aggregated rows (fractions) and the run settings;
* `results.md`: the table, values in percent with two decimals (rows: benchmarks, then the two overall means);
* `pass_at_k.png`: pass@k against k per benchmark and overall (matplotlib, Agg backend).

The table is built from the same per-question scores that go into the JSONL, and a test recomputes it from the
JSONL alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_spell.eval.metrics import (
    LB_MQA,
    MACRO,
    MICRO,
    MQA_BENCHMARKS,
    PAPER_AVG,
    GroupMetrics,
    aggregate,
)

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
TABLE = "results.md"
PLOT = "pass_at_k.png"


def write_predictions(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write one JSON object per question."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Read `predictions.jsonl` back."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(rows: Sequence[GroupMetrics], ks: Sequence[int], n: int) -> str:
    """A markdown table of mean@n and pass@k in percent (two decimals); '-' where k > n. A second
    table below the note gives their standard errors over questions."""
    header = ["benchmark", "questions", "samples", f"mean@{n}"] + [f"pass@{k}" for k in ks]

    def table(values) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            mean, passes = values(row)
            cells = [row.name, str(row.num_examples), str(row.num_samples), f"{100 * mean:.2f}"]
            cells += [f"{100 * passes[k]:.2f}" if k in passes else "-" for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    lines = table(lambda r: (r.mean_at_n, r.pass_at))
    lines.append("")
    lines.append(
        f"Scores in %. mean@{n} is the mean of the per-sample final scores (max of rule and judge); "
        "pass@k is the unbiased estimator 1 - C(n-c,k)/C(n,k). "
        f"'{MACRO}' is the unweighted mean over benchmarks, '{MICRO}' the mean over all questions. "
        f"'{LB_MQA}' (mean of {', '.join(MQA_BENCHMARKS)}) and '{PAPER_AVG}' (mean of docmath, frames, "
        "LB-MQA, longbench-v2) are the paper's columns, over the benchmarks present."
    )
    lines += ["", "Standard errors over questions (percentage points):", ""]
    lines += table(lambda r: (r.mean_se, {k: r.pass_se[k] for k in r.pass_at if k in r.pass_se}))
    return "\n".join(lines) + "\n"


def parse_markdown_table(text: str) -> dict[str, dict[str, str]]:
    """Parse the first table of `results.md` (the scores) back into {benchmark: {column: cell}} (used
    by tests and tools)."""
    table: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            if header is not None:
                break  # the end of the first table
            continue
        if line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        table[cells[0]] = dict(zip(header, cells, strict=True))
    return table


def plot_pass_at_k(rows: Sequence[GroupMetrics], path: Path) -> None:
    """Save pass@k curves (k on a log2 axis) for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ks = sorted(row.pass_at)
        style = "--" if row.name in (MACRO, MICRO, LB_MQA, PAPER_AVG) else "-"
        ax.plot(ks, [100 * row.pass_at[k] for k in ks], style, marker="o", label=row.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title("pass@k (unbiased estimator)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    rows: Sequence[dict[str, Any]], out_dir: Path, ks: Sequence[int], settings: dict[str, Any]
) -> list[GroupMetrics]:
    """Write predictions, metrics, table and plot for per-question `rows` (each with `benchmark`, `scores`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(rows, out_dir / PREDICTIONS)
    groups = aggregate([(r["benchmark"], r["scores"]) for r in rows], ks)
    n = max((len(r["scores"]) for r in rows), default=0)
    (out_dir / TABLE).write_text(markdown_table(groups, ks, n), encoding="utf-8")
    payload = {
        "settings": settings,
        "groups": [
            {
                "name": g.name,
                "num_examples": g.num_examples,
                "num_samples": g.num_samples,
                "mean_at_n": g.mean_at_n,
                "pass_at_k": {str(k): v for k, v in g.pass_at.items()},
                "mean_at_n_se": g.mean_se,
                "pass_at_k_se": {str(k): v for k, v in g.pass_se.items()},
            }
            for g in groups
        ],
    }
    (out_dir / METRICS).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if groups:
        plot_pass_at_k(groups, out_dir / PLOT)
    logger.info("wrote %s, %s, %s and %s in %s", PREDICTIONS, METRICS, TABLE, PLOT, out_dir)
    return groups
