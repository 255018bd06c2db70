"""GPU tier: `mcore/offload.py` on CUDA frees device memory and brings the state back exactly.

A tiny bf16 Qwen3 with the distributed optimizer (the presets' setting: flat bf16 `param_data`, fp32
main-param shards, Adam moments) takes one step; grads, params and optimizer state are offloaded,
`torch.cuda.memory_allocated()` must drop by at least the optimizer state's size (and by what the
functions report), then everything is onloaded and a second step must equal the second step of an
engine that never offloaded. Deterministic algorithms are on, and a third engine without offload
measures the run-to-run floor the comparison is allowed.

Runs only where CUDA is present and the GPUs are visible to the session (`pytest -m gpu tests/gpu`,
see tests/helpers/gpu_env.py); skipped elsewhere. The engines run in a fresh interpreter (its NCCL
group and Megatron's parallel state stay out of the pytest process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _offload_on_cuda(hf_dir: str, ckpt: str) -> dict:
    """Engines on one CUDA rank: A (step, step), C (the same), B (step, offload, onload, step)."""
    import torch

    from megatron_spell.mcore import offload
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel
    from tests.dist.mcore._engine_harness import fixed_batch, layout
    from tests.dist.mcore.test_offload import _engine, _state

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    ctx = init_parallel(layout())
    batch = fixed_batch()

    def two_steps():
        e = _engine(hf_dir, ckpt, ctx, "bf16", True)
        e.train_step(batch)
        e.train_step(batch)
        out = _state(e)
        del e
        torch.cuda.empty_cache()
        return out

    ref, control = two_steps(), two_steps()

    b = _engine(hf_dir, ckpt, ctx, "bf16", True)
    b.train_step(batch)
    members = list(offload._members(b.optimizer))
    adam_bytes = sum(
        v.untyped_storage().nbytes()
        for m in members
        for st in m.optimizer.state.values()
        for k, v in st.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    moved = {
        "opt": offload.offload_optimizer(b.optimizer),
        "params": offload.offload_params(b.models),
        "grads": offload.offload_grads(b.models),
    }
    torch.cuda.synchronize()
    offloaded = torch.cuda.memory_allocated()
    restored = {
        "params": offload.onload_params(b.models),
        "grads": offload.onload_grads(b.models),
        "opt": offload.onload_optimizer(b.optimizer),
    }
    torch.cuda.synchronize()
    back = torch.cuda.memory_allocated()
    devices = sorted({p.device.type for m in b.models for p in m.parameters()})
    state_devices = sorted(
        {v.device.type for m in members for st in m.optimizer.state.values() for v in st.values()}
    )
    metrics = b.train_step(batch)
    got = _state(b)
    destroy_parallel()
    return {
        "adam_bytes": adam_bytes,
        "moved": moved,
        "restored": restored,
        "before": before,
        "offloaded": offloaded,
        "back": back,
        "devices": devices,
        "state_devices": state_devices,
        "skipped": metrics["train/skipped"],
        "diff": _max_diff(got, ref),
        "control": _max_diff(control, ref),
    }


def test_offload_frees_cuda_memory_and_is_exact(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (GPU-only test)")
    from tests.helpers.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "qwen3", "qwen3", num_hidden_layers=2)
    ckpt = tmp_path / "ckpt"
    tool = ROOT / "tools" / "convert_hf_to_megatron.py"
    cmd = [sys.executable, str(tool), "--hf-dir", str(hf), "--out-dir", str(ckpt), "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True)
    code = (
        "import json, sys\n"
        "from tests.gpu.test_gpu_offload import _offload_on_cuda\n"
        "print(json.dumps(_offload_on_cuda(sys.argv[1], sys.argv[2])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(hf), str(ckpt)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    moved, restored = out["moved"], out["restored"]
    # every kind really left the device, and came back at the same size
    assert all(v > 0 for v in moved.values()) and restored == moved, out
    assert moved["opt"] >= out["adam_bytes"] > 0, out
    drop = out["before"] - out["offloaded"]
    assert drop >= out["adam_bytes"], out
    assert drop >= sum(moved.values()), out
    assert abs(out["back"] - out["before"]) <= MIB, out
    assert out["devices"] == ["cuda"] and "cuda" in out["state_devices"], out
    # the step after the round trip is the step without it (up to the run-to-run floor)
    assert out["skipped"] == 0.0, out
    assert out["diff"] <= max(out["control"], 1e-7), out
