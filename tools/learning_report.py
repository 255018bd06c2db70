"""The learning run's evidence: training curves with their trend, and the before/after evaluation.

    python tools/learning_report.py --run runs/learn-X --before runs/eval-base --after runs/eval-learn \
        --png docs/learning-run.png

Reads the run's `metrics.jsonl` and its rollout dumps (`rollouts/step_*_rounds.jsonl`: every responder
answer of the step's generation rounds), and two `megatron-spell eval` output directories. Prints markdown:

* per curve, the mean over the first and over the last third of the steps, the spread between steps (standard
  deviation of the per-step values) and the least-squares slope per 10 steps with its standard error, so a
  trend can be told from noise (|slope| / SE > 2);
* the evaluation table before and after, mean@n and pass@k with standard errors over questions, and the
  share of answers that carry the answer sentence the scorer parses;
* the paired difference after - before of each question's mean@n, with its standard error (the same
  questions, so the pairing removes the between-question spread).

Writes one PNG: the curves with a 5-step running mean, and the evaluation bars with their errors.
The rollout metrics are measured on the policy's own fresh questions of each step (docs/learning-run.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (metric key, label); "responder/answer_format_frac" is recomputed from the dumps when not logged
CURVES = [
    ("responder/reward_mean", "responder reward"),
    ("responder/pass_rate", "responder pass rate (groups with a correct answer)"),
    ("responder/answer_format_frac", "responder answers with the answer sentence"),
    ("questioner/valid_format_frac", "questioner valid format (1 - bad_format)"),
    ("questioner/reward_mean", "questioner difficulty reward"),
    ("verifier/agreement", "verifier agreement with the rule score"),
]


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} from metrics.jsonl, plus the answer-format share from the dumps."""
    from megatron_spell.spell.scorers import parse_prediction

    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "step" in r]
    out: dict[str, list[tuple[int, float]]] = {key: [] for key, _ in CURVES}
    for r in rows:
        if "questioner/bad_format_frac" in r:
            r["questioner/valid_format_frac"] = 1.0 - r["questioner/bad_format_frac"]
        for key, _ in CURVES:
            if key in r:
                out[key].append((int(r["step"]), float(r[key])))
    if not out["responder/answer_format_frac"]:
        for path in sorted((run / "rollouts").glob("step_*_rounds.jsonl")):
            step = int(path.name.split("_")[1]) + 1  # dumps are named by the step index from 0
            texts = [(g["task"], t) for g in read_jsonl(path) for t in g["responses"]]
            if texts:
                ok = sum(parse_prediction(task, t) is not None for task, t in texts)
                out["responder/answer_format_frac"].append((step, ok / len(texts)))
    return out


def trend(points: list[tuple[int, float]]) -> dict[str, float]:
    """First/last-third means, between-step spread, OLS slope per 10 steps and its standard error."""
    xs = [float(s) for s, _ in points]
    ys = [v for _, v in points]
    n = len(ys)
    third = max(1, n // 3)
    mean_y = sum(ys) / n
    spread = math.sqrt(sum((y - mean_y) ** 2 for y in ys) / (n - 1)) if n > 1 else 0.0
    out = {"first": sum(ys[:third]) / third, "last": sum(ys[-third:]) / third, "spread": spread}
    if n > 2:
        mx = sum(xs) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
        resid = [y - (mean_y + slope * (x - mx)) for x, y in zip(xs, ys, strict=True)]
        se = math.sqrt(sum(e * e for e in resid) / (n - 2) / sxx)
        out.update(slope=10 * slope, slope_se=10 * se)
    return out


def eval_summary(path: Path) -> dict:
    """mean@n / pass@k with SEs (overall micro row), the answer-format share, and per-question means."""
    from megatron_spell.eval.metrics import MICRO
    from megatron_spell.eval.report import METRICS, PREDICTIONS, read_predictions
    from megatron_spell.spell.scorers import parse_prediction

    payload = json.loads((path / METRICS).read_text())
    micro = next(g for g in payload["groups"] if g["name"] == MICRO)
    preds = read_predictions(path / PREDICTIONS)
    texts = [(p["task"], s) for p in preds for s in p["predictions"]]
    ok = sum(parse_prediction(task, t) is not None for task, t in texts)
    per_q = {p["id"]: sum(p["scores"]) / len(p["scores"]) for p in preds}
    return {"micro": micro, "format": ok / len(texts), "per_q": per_q, "n": len(preds[0]["scores"])}


def paired(before: dict, after: dict) -> tuple[float, float, int]:
    from megatron_spell.eval.metrics import standard_error

    ids = sorted(set(before["per_q"]) & set(after["per_q"]))
    d = [after["per_q"][i] - before["per_q"][i] for i in ids]
    return sum(d) / len(d), standard_error(d), len(d)


def plot(curves, evals, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, label) in zip(axes.flat, CURVES):
        pts = curves.get(key) or []
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o", alpha=0.4, ms=3, label="per step")
            w = 5
            run = [
                sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, run, "-", lw=2, label=f"{w}-step running mean")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    if evals:
        names = list(evals)
        for ax, (metric, title) in zip(
            axes.flat[len(CURVES) :], [("mean", "held-out mean@n"), ("pass", "held-out pass@n")]
        ):
            vals, errs = [], []
            for name in names:
                m = evals[name]["micro"]
                if metric == "mean":
                    vals.append(100 * m["mean_at_n"])
                    errs.append(100 * m.get("mean_at_n_se", 0.0))
                else:
                    k = str(evals[name]["n"])
                    vals.append(100 * m["pass_at_k"][k])
                    errs.append(100 * m.get("pass_at_k_se", {}).get(k, 0.0))
            ax.bar(names, vals, yerr=errs, capsize=6, color=["#999999", "#3b75af"][: len(names)])
            ax.set_title(title + " (%, error bars: 1 SE over questions)", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("SPELL learning run: SmolLM2-135M-Instruct on CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--before", type=Path, help="eval output dir of the base model")
    ap.add_argument("--after", type=Path, help="eval output dir of the trained model")
    ap.add_argument("--png", type=Path, help="where to write the figure")
    args = ap.parse_args(argv)
    curves = step_curves(args.run)
    print(
        "| curve | steps | first third | last third | spread between steps | slope per 10 steps |"
    )
    print("|---|---|---|---|---|---|")
    for key, label in CURVES:
        pts = curves.get(key) or []
        if not pts:
            continue
        t = trend(pts)
        slope = f"{t['slope']:+.4f} ± {t['slope_se']:.4f}" if "slope" in t else "-"
        print(
            f"| {label} | {len(pts)} | {t['first']:.4f} | {t['last']:.4f} | {t['spread']:.4f} | {slope} |"
        )
    evals = {}
    if args.before:
        evals["base"] = eval_summary(args.before)
    if args.after:
        evals["trained"] = eval_summary(args.after)
    if evals:
        n = next(iter(evals.values()))["n"]
        print()
        print(f"| model | questions | mean@{n} | pass@{n} | pass@1 | answer sentence |")
        print("|---|---|---|---|---|---|")
        for name, e in evals.items():
            m = e["micro"]
            k = str(e["n"])
            print(
                f"| {name} | {m['num_examples']} | {100 * m['mean_at_n']:.2f} ± "
                f"{100 * m.get('mean_at_n_se', 0):.2f} | {100 * m['pass_at_k'][k]:.2f} ± "
                f"{100 * m.get('pass_at_k_se', {}).get(k, 0):.2f} | {100 * m['pass_at_k']['1']:.2f} | "
                f"{100 * e['format']:.1f}% |"
            )
        if len(evals) == 2:
            mu, se, q = paired(evals["base"], evals["trained"])
            print(
                f"\npaired mean@{n} difference (trained - base) over {q} questions: "
                f"{100 * mu:+.2f} ± {100 * se:.2f} points"
            )
    if args.png:
        plot(curves, evals, args.png)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
