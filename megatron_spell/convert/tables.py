"""HF <-> Megatron-Core name/layout tables: the per-family rules plus what every family shares.

Each family's `Rule`s live with the rest of its HF-config facts in the model-family registry
(megatron_spell/families.py); `get_family(hf_config)` picks the family from `config.architectures` /
`config.model_type` and rejects the HF flags it cannot express. This module adds the converter-only
tables that every family shares.

The same tables serve the offline tools (mcore/checkpoint.py) and the in-memory weight sync of the rollout
(convert/stream.py `megatron_to_hf`). Megatron names also accepted on the way back (aliases):
- the Transformer Engine spec's fused-norm names (`self_attention.linear_qkv.layer_norm_weight`,
  `mlp.linear_fc1.layer_norm_weight`); these are also the keys that `GPTModel.sharded_state_dict()` uses
  in checkpoints for both specs (the local spec maps its names onto them);
- the grouped-GEMM expert names `mlp.experts.linear_fc1.weight{e}` (TEGroupedMLP / GroupedMLP params).

Deliberate limits: no o_proj / MLP biases (Megatron's single `add_bias_linear` flag cannot express
"attention bias but no MLP bias"), no shared experts, no MLA; `get_family` rejects such configs by name.
"""

from __future__ import annotations

from typing import Any

from megatron_spell.families import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    GLOBAL_RULES,
    HL,
    LLAMA_LIKE_RULES,
    MOE_MLP_RULES,
    L,
    ModelFamily,
    Rule,
    family_of,
    supported_architectures,
)

__all__ = [
    "ATTENTION_RULES",
    "DENSE_MLP_RULES",
    "GLOBAL_RULES",
    "HF_FUSED_EXPERTS",
    "HF_IGNORED_SUFFIXES",
    "LLAMA_LIKE_RULES",
    "MEGATRON_ALIASES",
    "MOE_MLP_RULES",
    "ArchFamily",
    "Rule",
    "attention_dims",
    "get_family",
    "supported_architectures",
]

# The converter's name for a registry record.
ArchFamily = ModelFamily

# HF fused expert tensors (transformers 5.x in-memory layout) -> the per-expert names of the rules.
HF_FUSED_EXPERTS = {
    "gate_up": HL + "mlp.experts.gate_up_proj",  # [E, 2I, H] = per expert [gate; up]
    "down": HL + "mlp.experts.down_proj",  # [E, H, I]
}

# Other Megatron spellings of the same parameter (TE fused norms, grouped-GEMM experts) -> local-spec name.
MEGATRON_ALIASES = (
    (L + "self_attention.linear_qkv.layer_norm_weight", L + "input_layernorm.weight"),
    (L + "mlp.linear_fc1.layer_norm_weight", L + "pre_mlp_layernorm.weight"),
    (L + "mlp.experts.linear_fc1.weight{e}", L + "mlp.experts.local_experts.{e}.linear_fc1.weight"),
    (L + "mlp.experts.linear_fc2.weight{e}", L + "mlp.experts.local_experts.{e}.linear_fc2.weight"),
)

# HF tensors that carry no weights (old checkpoints store RoPE buffers).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def get_family(hf_config: Any) -> ModelFamily:
    """Return the family of an HF config; ValueError naming the architecture if it is unsupported."""
    return family_of(hf_config)


def attention_dims(hf_config: Any) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of an HF config."""
    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return heads, kv, int(head_dim)
