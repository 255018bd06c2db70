"""`megatron-spell report RUN_DIR`: a PNG of the main training curves and a short markdown summary.

Reads only `RUN_DIR/metrics.jsonl` (written by `metrics.MetricsLogger`), so it works on a finished run, a
running one, or a copy of the file.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_spell.metrics import read_jsonl

# (panel title, ((metric key, legend label), ...)): every curve is labelled by what it is (the role of a
# reward, the phase of a time), since several panels plot the same metric name for different roles
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Loss", (("train/loss", "policy loss (all roles)"),)),
    (
        "Reward by role",
        (
            ("responder/reward_mean", "responder"),
            ("questioner/reward_mean", "questioner"),
            ("verifier/reward_mean", "verifier"),
        ),
    ),
    (
        "Questioner cases",
        (
            ("questioner/bad_format_frac", "bad format"),
            ("questioner/bad_ground_frac", "bad grounding"),
            ("questioner/zero_variance_frac", "zero variance"),
        ),
    ),
    (
        "Verifier",
        (
            ("verifier/agreement", "verifier agreement"),
            ("verifier/invalid_vote_frac", "verifier invalid votes"),
        ),
    ),
    (
        "Context",
        (
            ("questioner/docs_per_prompt", "documents per questioner prompt"),
            ("data/history_size", "history memory size"),
        ),
    ),
    (
        "Time per step (s)",
        (
            ("timing/generate_s", "generate"),
            ("timing/train_s", "update"),
            ("timing/sync_s", "weight sync"),
            ("timing/step_s", "step"),
        ),
    ),
    (
        "Peak resident memory (GB, process tree)",
        (
            ("memory/peak_rss_gb/generate", "generate"),
            ("memory/peak_rss_gb/train", "update"),
            ("memory/peak_rss_gb/sync", "weight sync"),
            ("memory/peak_rss_gb/checkpoint", "checkpoint"),
        ),
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

    dtype = _run_dtype(run_dir)
    fig = plot(
        rows, f"SPELL run {run_dir.name}: {len(rows)} steps" + (f", {dtype}" if dtype else "")
    )
    png = run_dir / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    md = run_dir / "report.md"
    md.write_text(_markdown(run_dir.name, rows, dtype))
    return f"wrote {png} and {md}"


def plot(rows: list[dict[str, float]], title: str):  # -> matplotlib Figure
    """The report's figure: one panel per `PANELS` entry, each curve labelled as there."""
    import matplotlib.pyplot as plt

    cols = math.ceil(len(PANELS) / 2)
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8))
    for ax, (panel, curves) in zip(axes.flat, PANELS):
        for key, label in curves:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _run_dtype(run_dir: Path) -> str | None:
    """`model.dtype` of the run's saved config.yaml (None when absent or unreadable)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        dtype = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("dtype")
    except (yaml.YAMLError, AttributeError):
        return None
    return str(dtype) if dtype else None


def _markdown(name: str, rows: list[dict[str, float]], dtype: str | None = None) -> str:
    keys = [k for _, curves in PANELS for k, _ in curves if not k.startswith("memory/")]
    lines = [
        f"# SPELL run `{name}`",
        "",
        f"{len(rows)} steps logged (steps {int(rows[0]['step'])}..{int(rows[-1]['step'])})"
        + (f"; model dtype {dtype} (Megatron and vLLM)." if dtype else "."),
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
    lines += memory_table(rows)
    return "\n".join(lines) + "\n"


def _packing_line(rows: list[dict[str, float]]) -> list[str]:
    """Tokens the update ran through the model per step, and the shared-prefix units among them."""
    have = [r for r in rows if "train/num_model_tokens" in r]
    if not have:
        return []

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in have) / len(have)

    model, traj = mean("train/num_model_tokens"), mean("train/num_trajectory_tokens")
    versus = (
        f" for {traj:.0f} trajectory tokens ({traj / model:.2f}x fewer)" if traj and model else ""
    )
    return [
        "",
        f"Update: {model:.0f} tokens through the model per step{versus} "
        f"(train.shared_prefix units {mean('train/shared_prefix_units'):.1f}, split "
        f"{mean('train/shared_prefix_split_units'):.1f}, unshared fallbacks "
        f"{mean('train/shared_prefix_fallback'):.1f}; train "
        f"{mean('timing/train_s'):.2f} s per step).",
    ]


def memory_table(rows: list[dict[str, float]]) -> list[str]:
    """Peak resident memory of the process tree by phase (GB): the largest over the steps, and the
    step it happened in ([] when the run logged none)."""
    prefix = "memory/peak_rss_gb/"
    phases = sorted({k[len(prefix) :] for r in rows for k in r if k.startswith(prefix)})
    if not phases:
        return []
    lines = [
        "",
        "Peak resident memory of the process tree by phase (GB; `memory.py` says how it is taken):",
        "",
        "| phase | peak GB | at step | mean over steps |",
        "|---|---|---|---|",
    ]
    top_all = 0.0
    for phase in phases:
        xs, ys = _series(rows, prefix + phase)
        if not ys:
            continue
        top = max(ys)
        top_all = max(top_all, top)
        lines.append(f"| {phase} | {top:.2f} | {xs[ys.index(top)]} | {sum(ys) / len(ys):.2f} |")
    lines.append(f"| **any phase** | {top_all:.2f} | | |")
    return lines


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
