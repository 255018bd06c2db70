"""`megatron-spell report RUN_DIR`: a PNG of the main training curves and a short markdown summary.

Reads only `RUN_DIR/metrics.jsonl` (written by `metrics.MetricsLogger`), so it works on a finished run, a
running one, or a copy of the file.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_spell.metrics import read_jsonl

PANELS = (
    ("Loss", ("train/loss",)),
    ("Rewards", ("responder/reward_mean", "questioner/reward_mean", "verifier/reward_mean")),
    (
        "Questioner cases",
        (
            "questioner/bad_format_frac",
            "questioner/bad_ground_frac",
            "questioner/zero_variance_frac",
        ),
    ),
    ("Verifier", ("verifier/agreement", "verifier/invalid_vote_frac")),
    ("Context", ("questioner/docs_per_prompt", "data/history_size")),
    (
        "Time per step (s)",
        ("timing/generate_s", "timing/train_s", "timing/sync_s", "timing/step_s"),
    ),
)


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            xs.append(int(row["step"]))
            ys.append(float(value))
    return xs, ys


def write_report(run_dir: str | Path) -> str:
    """Write `report.png` and `report.md` into `run_dir`; return a one-line description of both."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} does not exist: is {run_dir} a training run directory?"
        )
    rows = read_jsonl(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} has no rows yet: run at least one step")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"SPELL run {run_dir.name}: {len(rows)} steps")
    fig.tight_layout()
    png = run_dir / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    md = run_dir / "report.md"
    md.write_text(_markdown(run_dir.name, rows))
    return f"wrote {png} and {md}"


def _markdown(name: str, rows: list[dict[str, float]]) -> str:
    keys = [k for _, ks in PANELS for k in ks]
    lines = [
        f"# SPELL run `{name}`",
        "",
        f"{len(rows)} steps logged (steps {int(rows[0]['step'])}..{int(rows[-1]['step'])}).",
        "",
        "| metric | first | last | mean |",
        "|---|---|---|---|",
    ]
    for key in keys:
        _, ys = _series(rows, key)
        if ys:
            lines.append(f"| {key} | {ys[0]:.4g} | {ys[-1]:.4g} | {sum(ys) / len(ys):.4g} |")
    lines += _timing_table(rows)
    lines += _packing_line(rows)
    return "\n".join(lines) + "\n"


def _packing_line(rows: list[dict[str, float]]) -> list[str]:
    """Tokens the update ran through the model per step, and the shared-prefix units among them."""
    have = [r for r in rows if "train/num_model_tokens" in r]
    if not have:
        return []

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in have) / len(have)

    return [
        "",
        f"Update: {mean('train/num_model_tokens'):.0f} tokens through the model per step "
        f"(train.shared_prefix units {mean('train/shared_prefix_units'):.1f}, split "
        f"{mean('train/shared_prefix_split_units'):.1f}, unshared fallbacks "
        f"{mean('train/shared_prefix_fallback'):.1f}; train "
        f"{mean('timing/train_s'):.2f} s per step).",
    ]


_PHASES = ("generate", "score", "train", "sync", "checkpoint")


def _timing_table(rows: list[dict[str, float]]) -> list[str]:
    """Mean seconds per step by phase (generation split by role), and the orchestration overhead."""

    def mean(key: str) -> float:
        ys = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        return sum(ys) / len(rows) if ys else 0.0  # a phase absent from a step took 0 s there

    step = mean("timing/step_s")
    if not step:
        return []
    lines = [
        "",
        f"Time per step by phase (mean over the {len(rows)} steps):",
        "",
        "| phase | s | share of the step |",
        "|---|---|---|",
    ]
    phases = {p: mean(f"timing/{p}_s") for p in _PHASES}
    roles = sorted(
        k for k in rows[-1] if k.startswith("timing/generate_") and k != "timing/generate_s"
    )
    for phase, sec in phases.items():
        lines.append(f"| {phase} | {sec:.2f} | {sec / step:.1%} |")
        if phase == "generate":
            for key in roles:
                lines.append(
                    f"| - {key[len('timing/generate_') : -2]} | {mean(key):.2f} | {mean(key) / step:.1%} |"
                )
    other = step - sum(phases.values())
    lines += [
        f"| other (batching, dumps, metrics) | {other:.2f} | {other / step:.1%} |",
        f"| **step** | {step:.2f} | 100% |",
        "",
        "Orchestration overhead (everything but generation and training): "
        f"{(step - phases['generate'] - phases['train']) / step:.2%} of the step.",
    ]
    return lines
