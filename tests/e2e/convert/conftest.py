"""The tiny models of every family converted HF -> Megatron -> HF once for this folder's tests.

One driver process per direction (tests/dist/convert/convert_many.py) converts all of them: the per-process
import time is most of a conversion's cost. The export of `qwen3_moe` is forced into ~0.5 MB shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[3]
DRIVER = ROOT / "tests" / "dist" / "convert" / "convert_many.py"
VARIANTS = {
    "llama": ("llama", False),
    "qwen2": ("qwen2", False),
    "qwen3_tied": ("qwen3", True),
    "qwen3_moe": ("qwen3_moe", False),
}


def run_driver(direction: str, pairs: list[tuple[Path, Path]], extra: str = "") -> None:
    args = [str(p) for pair in pairs for p in pair]
    env = {**os.environ, "CONVERT_EXTRA_ARGS": extra}
    proc = subprocess.run(
        [sys.executable, str(DRIVER), direction, *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def roundtrip(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    dirs = {}
    for name, (family, tied) in VARIANTS.items():
        hf = make_tiny_hf_model(root / f"{name}_hf", family, tied=tied, seed=5)
        dirs[name] = (hf, root / f"{name}_ckpt", root / f"{name}_back")
    run_driver("to_megatron", [(hf, ck) for hf, ck, _ in dirs.values()])
    small = ["qwen3_moe"]  # forced into ~0.5 MB shards
    run_driver("to_hf", [(ck, back) for n, (_, ck, back) in dirs.items() if n not in small])
    run_driver("to_hf", [(dirs[n][1], dirs[n][2]) for n in small], extra="--max-shard-gb 0.0005")
    return dirs
