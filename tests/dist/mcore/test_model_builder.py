"""Tests for megatron_spell/mcore/model.py: HF config -> TransformerConfig mapping and the model builder.

References: the HF config values themselves (field mapping), transformers' own rotary embedding (RoPE
frequencies incl. scaling), and single-process Megatron runs (the multi-rank smoke tests compare TP=2 / PP=2 /
EP=2 against a TP=1 model holding the same weights). Exact HF-logit equality is the converter's test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_spell.config import ParallelConfig
from megatron_spell.mcore.model import (
    SUPPORTED_ARCHITECTURES,
    load_hf_config,
    padded_vocab_size,
    rope_settings,
    transformer_config_from_hf,
)
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.usefixtures("megatron_on_cpu")


def _hf(tmp_path: Path, family: str, **kw: Any) -> Any:
    return load_hf_config(make_tiny_hf_model(tmp_path / family, family, **kw))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_transformer_config_fields_per_family(tmp_path: Path, family: str) -> None:
    hf = _hf(tmp_path, family, num_hidden_layers=3, rms_norm_eps=1e-5)
    par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    c = transformer_config_from_hf(hf, par, dtype=torch.bfloat16)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (3, 128, 256)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 32)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-5
    assert c.gated_linear_unit and c.activation_func is torch.nn.functional.silu
    assert not c.add_bias_linear
    assert c.add_qkv_bias is (family == "qwen2")
    assert c.qk_layernorm is (family in ("qwen3", "qwen3_moe"))
    assert c.params_dtype == torch.bfloat16 and c.bf16 and c.pipeline_dtype == torch.bfloat16
    assert c.tensor_model_parallel_size == 2 and c.sequence_parallel
    assert c.expert_tensor_parallel_size == 2  # None in the ParallelConfig means "= TP"
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
    assert c.init_method_std == hf.initializer_range
    if family == "qwen3_moe":
        assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (4, 2, 64)
        assert c.moe_router_pre_softmax is False  # norm_topk_prob=True
        assert c.moe_router_load_balancing_type == "none" and c.moe_aux_loss_coeff == 0.0
        assert c.moe_token_dispatcher_type == "alltoall" and c.moe_router_dtype == "fp32"
        assert c.moe_shared_expert_intermediate_size is None and c.moe_layer_freq == 1
    else:
        assert c.num_moe_experts is None


def test_qwen3_kv_channels_from_explicit_head_dim(tmp_path: Path) -> None:
    # Qwen3 decouples head_dim from hidden / heads (Qwen3-0.6B: hidden 1024, 16 heads, head_dim 128).
    hf = _hf(tmp_path, "qwen3", num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    c = transformer_config_from_hf(hf, ParallelConfig())
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (2, 1, 64)


def test_qwen3_moe_router_and_dense_layers(tmp_path: Path) -> None:
    hf = _hf(tmp_path, "qwen3_moe", num_hidden_layers=4, norm_topk_prob=False, mlp_only_layers=[2])
    c = transformer_config_from_hf(hf, ParallelConfig())
    assert c.moe_router_pre_softmax is True  # plain top-k of the full softmax
    assert c.moe_layer_freq == [1, 1, 0, 1]
    hf = _hf(tmp_path / "s", "qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)
    assert transformer_config_from_hf(hf, ParallelConfig()).moe_layer_freq == [0, 1, 0, 1]
    c = transformer_config_from_hf(
        hf, ParallelConfig(), moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3
    )
    assert c.moe_router_load_balancing_type == "aux_loss" and c.moe_aux_loss_coeff == 1e-3


def test_overrides_and_errors(tmp_path: Path) -> None:
    hf = _hf(tmp_path, "llama", tied=True)
    c = transformer_config_from_hf(
        hf,
        ParallelConfig(),
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    assert c.recompute_granularity == "full"
    with pytest.raises(ValueError, match="unknown TransformerConfig override"):
        transformer_config_from_hf(hf, ParallelConfig(), not_a_field=1)
    hf.architectures = ["MistralForCausalLM"]
    with pytest.raises(ValueError, match="MistralForCausalLM") as info:
        transformer_config_from_hf(hf, ParallelConfig())
    assert all(a in str(info.value) for a in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="config.json"):
        load_hf_config(tmp_path / "does-not-exist")
    bad = _hf(tmp_path / "b", "llama", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        transformer_config_from_hf(bad, ParallelConfig())
    assert padded_vocab_size(hf, 2) == 512
    hf.vocab_size = 49155
    assert padded_vocab_size(hf, 1) == 49155 and padded_vocab_size(hf, 2) == 49408


_ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
}


@pytest.mark.parametrize("case", list(_ROPE_CASES))
def test_rope_matches_transformers(tmp_path: Path, case: str) -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = _ROPE_CASES[case]
    kw = {"rope_parameters": {"rope_theta": 50000.0, **(scaling or {"rope_type": "default"})}}
    hf = _hf(tmp_path, "llama", max_position_embeddings=4096, **kw)
    rope = rope_settings(hf)
    assert rope["rotary_base"] == 50000.0
    seq = 3000
    common = dict(
        kv_channels=32,
        rotary_percent=rope["rotary_percent"],
        rotary_base=50000.0,
        use_cpu_initialization=True,
    )
    if case == "yarn":
        y = {k.removeprefix("yarn_"): v for k, v in rope["yarn"].items()}
        y["scaling_factor"] = y.pop("rotary_scaling_factor")
        emb, mscale = YarnRotaryEmbedding(**common, **y).get_emb(seq)
    else:
        emb = RotaryEmbedding(
            **common,
            seq_len_interpolation_factor=rope["seq_len_interpolation_factor"],
            rope_scaling=rope["rope_scaling"],
            rope_scaling_factor=rope["rope_scaling_factor"],
        ).get_emb(seq)
        mscale = 1.0
    cos_m = (torch.cos(emb.float()) * mscale).reshape(seq, -1)
    cos_h, _ = LlamaRotaryEmbedding(hf)(
        torch.zeros(1, dtype=torch.float32), torch.arange(seq)[None]
    )
    torch.testing.assert_close(cos_m, cos_h[0].float(), atol=2e-5, rtol=0)


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    hf = _hf(tmp_path, "llama")
    hf.rope_parameters = {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic"):
        rope_settings(hf)
    hf.rope_parameters = {
        "rope_theta": 1e4,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_settings(hf)
