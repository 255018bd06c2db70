"""Declarative HF <-> Megatron-Core name/layout tables, one per architecture family (issue 2, item 5).

A `Rule` pairs one Megatron-Core GPTModel parameter (as `GPTModel.state_dict()` of the local layer spec
names it, `{i}` = global layer index, `{e}` = global expert index) with the HF tensor(s) it is made of and the
transform between them (transforms.py). `ArchFamily` lists the rules of one family; `get_family(hf_config)`
picks the family from `config.architectures` / `config.model_type`.

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

from dataclasses import dataclass
from typing import Any

L = "decoder.layers.{i}."
HL = "model.layers.{i}."


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter <-> its HF tensor(s).

    transform: "copy"; "vocab" (pad rows to Megatron's padded vocab / slice back); "qkv" (hf = q, k, v);
    "gate_up" (hf = gate, up). when: "always", "qkv_bias", "qk_norm", "untied", "dense", "moe".
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = "copy"
    when: str = "always"
    expert: bool = False  # pattern has {e}: expanded once per expert


GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

ATTENTION_RULES = (
    Rule(L + "input_layernorm.weight", (HL + "input_layernorm.weight",)),
    Rule(
        L + "self_attention.linear_qkv.weight",
        tuple(HL + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        L + "self_attention.linear_qkv.bias",
        tuple(HL + f"self_attn.{p}_proj.bias" for p in "qkv"),
        "qkv",
        when="qkv_bias",
    ),
    Rule(
        L + "self_attention.q_layernorm.weight", (HL + "self_attn.q_norm.weight",), when="qk_norm"
    ),
    Rule(
        L + "self_attention.k_layernorm.weight", (HL + "self_attn.k_norm.weight",), when="qk_norm"
    ),
    Rule(L + "self_attention.linear_proj.weight", (HL + "self_attn.o_proj.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (HL + "post_attention_layernorm.weight",)),
)

DENSE_MLP_RULES = (
    Rule(
        L + "mlp.linear_fc1.weight",
        (HL + "mlp.gate_proj.weight", HL + "mlp.up_proj.weight"),
        "gate_up",
        when="dense",
    ),
    Rule(L + "mlp.linear_fc2.weight", (HL + "mlp.down_proj.weight",), when="dense"),
)

MOE_MLP_RULES = (
    Rule(L + "mlp.router.weight", (HL + "mlp.gate.weight",), when="moe"),
    Rule(
        L + "mlp.experts.local_experts.{e}.linear_fc1.weight",
        (HL + "mlp.experts.{e}.gate_proj.weight", HL + "mlp.experts.{e}.up_proj.weight"),
        "gate_up",
        when="moe",
        expert=True,
    ),
    Rule(
        L + "mlp.experts.local_experts.{e}.linear_fc2.weight",
        (HL + "mlp.experts.{e}.down_proj.weight",),
        when="moe",
        expert=True,
    ),
)

# HF fused expert tensors (transformers 5.x in-memory layout) -> the per-expert names above.
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


@dataclass(frozen=True)
class ArchFamily:
    """One architecture family: how its HF config and tensors map onto Megatron-Core's GPTModel."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    qkv_bias: bool  # HF q/k/v carry biases (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    moe: bool
    rules: tuple[Rule, ...] = GLOBAL_RULES + ATTENTION_RULES + DENSE_MLP_RULES + MOE_MLP_RULES

    def is_moe_layer(self, hf_config: Any, layer: int) -> bool:
        """Qwen3-MoE's rule: a layer is sparse unless listed in mlp_only_layers or off the sparse step."""
        if not self.moe:
            return False
        if layer in (getattr(hf_config, "mlp_only_layers", None) or []):
            return False
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        return hf_config.num_experts > 0 and (layer + 1) % step == 0

    def condition(self, hf_config: Any, when: str, layer: int | None = None) -> bool:
        """Whether a rule with `when` applies to this config (and layer)."""
        if when == "always":
            return True
        if when == "qkv_bias":
            return self.qkv_bias
        if when == "qk_norm":
            return self.qk_norm
        if when == "untied":
            return not getattr(hf_config, "tie_word_embeddings", False)
        if when in ("dense", "moe"):
            assert layer is not None
            return self.is_moe_layer(hf_config, layer) == (when == "moe")
        raise ValueError(f"unknown rule condition {when!r}")


FAMILIES: tuple[ArchFamily, ...] = (
    ArchFamily(
        "llama", ("LlamaForCausalLM",), ("llama",), qkv_bias=False, qk_norm=False, moe=False
    ),
    ArchFamily("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), qkv_bias=True, qk_norm=False, moe=False),
    ArchFamily("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qkv_bias=False, qk_norm=True, moe=False),
    ArchFamily(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        ("qwen3_moe",),
        qkv_bias=False,
        qk_norm=True,
        moe=True,
    ),
)


def supported_architectures() -> list[str]:
    """All HF architecture names the converter handles."""
    return [a for f in FAMILIES for a in f.architectures]


def get_family(hf_config: Any) -> ArchFamily:
    """Return the family of an HF config; ValueError naming the architecture if it is unsupported."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    family = next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)
    if family is None and not archs:
        family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        raise ValueError(
            f"unsupported architecture {archs or model_type!r}; supported: "
            f"{', '.join(supported_architectures())}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False) and family.name != "qwen2":
            raise ValueError(
                f"{family.architectures[0]} with {flag}=True is not supported (Megatron's add_bias_linear "
                "cannot express it); set it to false or convert another model"
            )
    if family.moe and getattr(hf_config, "shared_expert_intermediate_size", 0):
        raise ValueError(f"{family.name}: shared experts are not supported")
    return family


def num_layers(hf_config: Any) -> int:
    return int(hf_config.num_hidden_layers)


def attention_dims(hf_config: Any) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of an HF config."""
    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return heads, kv, int(head_dim)
