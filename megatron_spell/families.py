"""The model-family registry: every HF-config fact of a supported architecture, in one place.

A `ModelFamily` says how one HF architecture maps onto Megatron-Core's GPTModel: the HF names that select
it, whether q/k/v carry biases, whether q and k have a per-head RMSNorm, where its MoE settings live in the
HF config and which layers are MoE, the HF flags it cannot express, and its converter tables (`Rule`s).
The model builder (mcore/model.py), the converter (convert/tables.py, convert/stream.py), the pre-flight
shape (layout.py `ModelShape`) and the rollout engine (rollout/engine.py) all read this module, so a new
family is one entry in `FAMILIES` (plus new rules if its tensors are laid out differently).

This module imports nothing heavy (no torch, megatron, vllm or transformers): `train --plan` reads it on a
laptop. Functions take an HF config either as a transformers `PretrainedConfig` or as the parsed
`config.json` dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

L = "decoder.layers.{i}."
HL = "model.layers.{i}."


def hf_get(hf_config: Any, key: str, default: Any = None) -> Any:
    """`key` of an HF config given as a `PretrainedConfig` or as a `config.json` dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def hf_first(hf_config: Any, keys: tuple[str, ...], default: Any = None) -> Any:
    """The first of `keys` that an HF config sets (a setting saved under another name, see MoEFields)."""
    for key in keys:
        value = hf_get(hf_config, key)
        if value is not None:
            return value
    return default


# --- converter tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter <-> its HF tensor(s).

    `megatron` is the name in `GPTModel.state_dict()` of the local layer spec (`{i}` = global layer index,
    `{e}` = global expert index). transform: "copy"; "vocab" (pad rows to Megatron's padded vocab / slice
    back); "qkv" (hf = q, k, v); "gate_up" (hf = gate, up). when: "always", "qkv_bias", "qk_norm",
    "untied", "dense", "moe" (see `ModelFamily.condition`).
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = "copy"
    when: str = "always"
    # the pattern has {e}: expanded once per expert
    expert: bool = False


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

# The Llama/Qwen layout: rules whose `when` does not hold for a config are skipped.
LLAMA_LIKE_RULES = GLOBAL_RULES + ATTENTION_RULES + DENSE_MLP_RULES + MOE_MLP_RULES


# --- the family record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEFields:
    """Where a family's HF config keeps its mixture-of-experts settings (HF attribute names)."""

    # the first name set wins: transformers 5 saves Qwen3-MoE's num_experts as num_local_experts
    num_experts: tuple[str, ...] = ("num_experts", "num_local_experts")
    topk: str = "num_experts_per_tok"
    ffn_hidden_size: str = "moe_intermediate_size"
    # True: top-k probabilities renormalised to sum to 1 (absent = True)
    norm_topk_prob: str = "norm_topk_prob"
    # every `sparse_step`-th layer (1-based) is MoE ...
    sparse_step: str = "decoder_sparse_step"
    # ... except the layers listed here, which stay dense
    dense_layers: str = "mlp_only_layers"


@dataclass(frozen=True)
class RejectedFlag:
    """An HF config setting the Megatron model cannot express; only `supported` is accepted."""

    name: str
    supported: Any
    reason: str

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(self.supported, bool | int):
            return bool(value) == bool(self.supported)
        return value == self.supported


_ATTENTION_BIAS = RejectedFlag(
    "attention_bias", False, "bias on q/k/v and o_proj; Megatron's add_qkv_bias covers q/k/v only"
)
_MLP_BIAS = RejectedFlag("mlp_bias", False, "Megatron's add_bias_linear is all-or-none")
COMMON_REJECTED = (
    RejectedFlag("hidden_act", "silu", "SwiGLU with silu only"),
    RejectedFlag("use_sliding_window", False, "no sliding-window attention"),
)
DENSE_REJECTED = COMMON_REJECTED + (_ATTENTION_BIAS, _MLP_BIAS)
MOE_REJECTED = DENSE_REJECTED + (
    RejectedFlag("shared_expert_intermediate_size", 0, "no shared experts (Qwen2-MoE style)"),
)


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family: how its HF config and tensors map onto Megatron-Core's GPTModel."""

    name: str
    # HF `architectures` entries that select this family
    architectures: tuple[str, ...]
    # HF `model_type`s that select it when a config names no architecture
    model_types: tuple[str, ...]
    # HF q/k/v projections carry biases, o_proj does not (Megatron add_qkv_bias)
    qkv_bias: bool
    # per-head RMSNorm on q and k (Megatron qk_layernorm)
    qk_norm: bool
    # where the MoE settings live; None: a dense family
    moe: MoEFields | None = None
    # HF settings this family's Megatron model cannot express
    rejected: tuple[RejectedFlag, ...] = DENSE_REJECTED
    # the converter tables
    rules: tuple[Rule, ...] = field(default=LLAMA_LIKE_RULES, repr=False)

    def check(self, hf_config: Any) -> None:
        """ValueError naming the flag, its value and the fix if `hf_config` sets a rejected flag."""
        for flag in self.rejected:
            value = hf_get(hf_config, flag.name)
            if not flag.accepts(value):
                raise ValueError(
                    f"{self.architectures[0]}: {flag.name}={value!r} is not supported "
                    f"({flag.reason}); set it to {flag.supported!r} or convert another model"
                )

    def num_experts(self, hf_config: Any) -> int:
        """Routed experts per MoE layer; 0 for a dense family or config."""
        if self.moe is None:
            return 0
        return int(hf_first(hf_config, self.moe.num_experts) or 0)

    def moe_topk(self, hf_config: Any) -> int:
        return 0 if self.moe is None else int(hf_get(hf_config, self.moe.topk) or 0)

    def moe_ffn_hidden_size(self, hf_config: Any) -> int:
        return 0 if self.moe is None else int(hf_get(hf_config, self.moe.ffn_hidden_size) or 0)

    def norm_topk_prob(self, hf_config: Any) -> bool:
        return self.moe is not None and bool(hf_get(hf_config, self.moe.norm_topk_prob, True))

    def is_moe(self, hf_config: Any) -> bool:
        """Whether this config has MoE layers at all."""
        return self.num_experts(hf_config) > 0

    def is_moe_layer(self, hf_config: Any, layer: int) -> bool:
        """A layer is MoE unless it is listed as dense or is off the sparse step (Qwen3-MoE's rule)."""
        if self.moe is None or not self.is_moe(hf_config):
            return False
        if layer in (hf_get(hf_config, self.moe.dense_layers) or []):
            return False
        step = int(hf_get(hf_config, self.moe.sparse_step, 1) or 1)
        return (layer + 1) % step == 0

    def moe_layer_pattern(self, hf_config: Any) -> list[int]:
        """1 for each MoE layer, 0 for each dense one."""
        layers = int(hf_get(hf_config, "num_hidden_layers"))
        return [int(self.is_moe_layer(hf_config, i)) for i in range(layers)]

    def condition(self, hf_config: Any, when: str, layer: int | None = None) -> bool:
        """Whether a rule with `when` applies to this config (and layer)."""
        if when == "always":
            return True
        if when == "qkv_bias":
            return self.qkv_bias
        if when == "qk_norm":
            return self.qk_norm
        if when == "untied":
            return not tied_embeddings(hf_config)
        if when in ("dense", "moe"):
            assert layer is not None
            return self.is_moe_layer(hf_config, layer) == (when == "moe")
        raise ValueError(f"unknown rule condition {when!r}")


def tied_embeddings(hf_config: Any) -> bool:
    """Whether the output layer shares the input embedding's weight."""
    return bool(hf_get(hf_config, "tie_word_embeddings", False))


# --- the registry ---------------------------------------------------------------------------------

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("llama", ("LlamaForCausalLM",), ("llama",), qkv_bias=False, qk_norm=False),
        # Qwen2 always has q/k/v biases; its attention_bias / mlp_bias are not read
        ModelFamily(
            "qwen2",
            ("Qwen2ForCausalLM",),
            ("qwen2",),
            qkv_bias=True,
            qk_norm=False,
            rejected=COMMON_REJECTED,
        ),
        ModelFamily("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qkv_bias=False, qk_norm=True),
        ModelFamily(
            "qwen3_moe",
            ("Qwen3MoeForCausalLM",),
            ("qwen3_moe",),
            qkv_bias=False,
            qk_norm=True,
            moe=MoEFields(),
            rejected=MOE_REJECTED,
        ),
    )
}


def supported_architectures() -> list[str]:
    """All HF architecture names of the registered families."""
    return [a for f in FAMILIES.values() for a in f.architectures]


def find_family(hf_config: Any) -> ModelFamily | None:
    """The registered family an HF config names (by architecture, else by model_type), or None."""
    archs = list(hf_get(hf_config, "architectures") or [])
    if archs:
        return next(
            (f for f in FAMILIES.values() if any(a in f.architectures for a in archs)), None
        )
    model_type = hf_get(hf_config, "model_type")
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def family_of(hf_config: Any, *, check_flags: bool = True) -> ModelFamily:
    """The family of a supported HF config; ValueError naming what is unsupported and the choices.

    check_flags=False: the architecture only (the rejected flags are then checked where the model is
    built, converted or planned).
    """
    family = find_family(hf_config)
    if family is None:
        archs = list(hf_get(hf_config, "architectures") or []) or None
        supported = ", ".join(
            f"{a} ({f.model_types[0]})" for f in FAMILIES.values() for a in f.architectures
        )
        raise ValueError(
            f"unsupported architecture {archs} (model_type {hf_get(hf_config, 'model_type')!r}); "
            f"supported: {supported}"
        )
    if check_flags:
        family.check(hf_config)
    return family


def is_moe_config(hf_config: Any) -> bool:
    """Whether an HF config describes an MoE model.

    A config no registered family claims counts as MoE when it sets the expert-count field of any
    registered MoE family (the rollout engine serves what vLLM can load, not only what Megatron builds).
    """
    family = find_family(hf_config)
    if family is not None:
        return family.is_moe(hf_config)
    fields = {n for f in FAMILIES.values() if f.moe is not None for n in f.moe.num_experts}
    return any(hf_get(hf_config, name) for name in fields)
