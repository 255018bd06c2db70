"""Converted checkpoints give transformers' logits at every layout.

For tiny random Llama, Qwen2, Qwen3 (untied and tied) and Qwen3-MoE models: HF -> Megatron dist checkpoint
with the CLI tool, then the Megatron model built by `build_model` and loaded with `load_checkpoint` at
TP=1, TP=2, TP=2+SP, PP=2 (plus EP=2 for MoE, interleaved PP=2 x VPP=2 for the 4-layer tied
Qwen3) on 2 gloo ranks must match the HF model's fp32 logits
(max abs diff <= 1e-4), and all layouts agree with each other (<= 1e-5: same checkpoint, only the
reduction order differs). A GPTModel built with plain megatron.core APIs and Megatron-LM's load calls
(plain_gpt.py, no megatron_spell model/convert code) loads the same checkpoint at TP=1 and TP=2 and matches
too ("plain_tp1", "plain_tp2"). One spawn per model keeps the 2-core CI time down.

Scaled RoPE (linear, llama3, yarn) goes through `build_model`'s own wiring (GPTModel's rotary kwargs, the
yarn config attributes) at TP=1 and TP=2 over 256 tokens, where each scaling moves HF's logits by > 1e-2
(checked against the same weights with default RoPE, so a model that ignores the scaling fails).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist.convert.workers import layouts_worker
from tests.helpers.convert import convert_to_megatron
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,  # Megatron's fixed low/high frequency factors and original length
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ROPE = {  # name -> (family, rope_parameters, max_position_embeddings)
    "llama_rope_linear": ("llama", {"rope_type": "linear", "factor": 4.0}, 2048),
    "llama_rope_llama3": ("llama", _LLAMA3, 16384),
    "qwen3_rope_yarn": (
        "qwen3",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
        2048,
    ),
}
VARIANTS = {  # name -> (family, tied, layers, HF config overrides)
    "llama": ("llama", False, 2, {}),
    "qwen2": ("qwen2", False, 2, {}),
    "qwen3": ("qwen3", False, 2, {}),
    "qwen3_tied": ("qwen3", True, 4, {}),  # 4 layers: also interleaved PP=2 x VPP=2
    "qwen3_moe": ("qwen3_moe", False, 2, {}),
    **{
        name: (
            family,
            False,
            2,
            {"rope_parameters": {"rope_theta": 10000.0, **rope}, "max_position_embeddings": n},
        )
        for name, (family, rope, n) in ROPE.items()
    },
}
LAYOUTS = {
    "tp1": {},
    "tp2": {"tensor_model_parallel_size": 2},
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
}
MOE_LAYOUTS = {**LAYOUTS, "ep2": {"expert_model_parallel_size": 2}}
VPP_LAYOUTS = {
    **LAYOUTS,
    "pp2_vpp2": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
}
ROPE_LAYOUTS = {k: LAYOUTS[k] for k in ("tp1", "tp2")}
TOKENS = [1, 17, 250, 33, 4, 98, 7, 301, 12, 45, 2, 480, 66, 3, 200, 9]
# scaled RoPE differs from the default mostly at long range (llama3 only rescales low frequencies)
ROPE_TOKENS = torch.randint(3, 500, (256,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    pairs = {}
    for name, (family, tied, layers, overrides) in VARIANTS.items():
        hf = make_tiny_hf_model(
            root / f"{name}_hf", family, tied=tied, seed=3, num_hidden_layers=layers, **overrides
        )
        pairs[name] = (hf, root / f"{name}_ckpt")
    convert_to_megatron(pairs.values())
    return pairs


def hf_logits(hf_dir: Path, tokens: list[int], *, default_rope: bool = False) -> np.ndarray:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    if default_rope:
        config.rope_parameters = {
            "rope_type": "default",
            "rope_theta": config.rope_parameters["rope_theta"],
        }
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_megatron_logits_match_hf_at_every_layout(converted, variant):
    hf_dir, ckpt = converted[variant]
    if variant in ROPE:
        tokens, layouts, plain_tps = ROPE_TOKENS, ROPE_LAYOUTS, ()
    else:
        layouts = {"qwen3_moe": MOE_LAYOUTS, "qwen3_tied": VPP_LAYOUTS}.get(variant, LAYOUTS)
        tokens, plain_tps = TOKENS, (1, 2)
    ref = hf_logits(hf_dir, tokens)
    if variant in ROPE:  # the scaling matters for these tokens
        assert np.abs(ref - hf_logits(hf_dir, tokens, default_rope=True)).max() > 1e-2
    per_rank = run_distributed(
        layouts_worker, 2, str(hf_dir), str(ckpt), layouts, tokens, plain_tps, timeout=600
    )
    got = {k: v for r in per_rank for k, v in r.items()}
    assert set(got) == set(layouts) | {f"plain_tp{tp}" for tp in plain_tps}
    for name, logits in got.items():
        diff = np.abs(logits - ref).max()
        assert diff <= 1e-4, f"{variant} {name}: max |megatron - hf| = {diff:.2e}"
    # One checkpoint, every layout: the same logits up to reduction order.
    for name in set(layouts) - {"tp1"}:
        assert np.abs(got[name] - got["tp1"]).max() <= 1e-5, name
