"""GPU tier smoke test: a tiny Qwen3 on CUDA, log-probs against transformers and one train step at TP=1.

Runs only where CUDA is present and the GPUs are visible to the session (`pytest -m gpu tests/gpu`, see
tests/helpers/gpu_env.py); skipped elsewhere. The engine runs in a fresh interpreter (its NCCL group and
Megatron's parallel state stay out of the pytest process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _engine_on_cuda(hf_dir: str, ckpt: str) -> dict:
    """One rank on CUDA: log-probs vs transformers (fp32, no TF32), then one optimizer step."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_spell.mcore.parallel import destroy_parallel
    from tests.dist.mcore._engine_harness import fixed_batch, layout, make_engine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    engine, _ctx = make_engine(hf_dir, ckpt, layout(), budget=256, lr=1e-3)
    devices = {p.device.type for m in engine.models for p in m.parameters()}
    batch = fixed_batch()
    lps = engine.compute_logprobs(batch)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    diff = 0.0
    with torch.no_grad():
        for s, lp in zip(batch, lps, strict=True):
            ids = torch.tensor([s.prompt_ids + s.response_ids], device="cuda")
            p = len(s.prompt_ids)
            logp = torch.log_softmax(hf(ids).logits[0].float() / 0.7, -1)[p - 1 : -1]
            ref = logp.gather(-1, torch.tensor(s.response_ids, device="cuda")[:, None])[:, 0]
            diff = max(diff, float((lp.to(ref.device) - ref).abs().max()))
    metrics = engine.train_step(batch)
    after = engine.compute_logprobs(batch)
    moved = max(float((a - b).abs().max()) for a, b in zip(lps, after, strict=True))
    destroy_parallel()
    return {
        "devices": sorted(devices),
        "lp_vs_hf": diff,
        "skipped": metrics["train/skipped"],
        "loss": metrics["train/loss"],
        "moved": moved,
    }


def test_tiny_model_trains_on_cuda(tmp_path):
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
        "from tests.gpu.test_gpu_smoke import _engine_on_cuda\n"
        "print(json.dumps(_engine_on_cuda(sys.argv[1], sys.argv[2])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(hf), str(ckpt)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == ["cuda"], out
    assert out["lp_vs_hf"] < 1e-4, out
    assert out["skipped"] == 0.0 and out["moved"] > 1e-3, out
