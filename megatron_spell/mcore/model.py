"""Build Megatron-Core GPT models from Hugging Face configs (Llama, Qwen2/2.5, Qwen3, Qwen3-MoE).

`transformer_config_from_hf` maps an HF config onto a
`TransformerConfig`; `build_model` builds one `GPTModel` chunk per virtual pipeline stage with the
Transformer Engine layer spec when TE imports and the local spec otherwise; `layer_spec` is the hook through
which the training engine swaps in its own core attention (packed THD sequences, context parallelism).

Mapping decisions:
- Qwen3-MoE `norm_topk_prob=True` (renormalised top-k softmax) is Megatron's `moe_router_pre_softmax=False`
  (softmax over the top-k logits, the same numbers); `norm_topk_prob=False` is `pre_softmax=True`.
- For RL the MoE auxiliary loss is off by default (`moe_router_load_balancing_type="none"`,
  `moe_aux_loss_coeff=0`); pass overrides to turn it on.
- Router in fp32 (`moe_router_dtype="fp32"`), as HF computes the router softmax in fp32.
- `batch_p2p_comm=False` without CUDA: batched p2p on gloo gives a silently wrong loss with interleaved
  pipelines (docs/platform.md).
- The vocabulary is padded only when TP does not divide it (to a multiple of 128 x TP, Megatron's rule);
  `padded_vocab_size` tells converters and the logprob code the size.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_spell.config import ParallelConfig
from megatron_spell.families import FAMILIES, ModelFamily, family_of, tied_embeddings
from megatron_spell.mcore.parallel import ParallelContext

logger = logging.getLogger(__name__)

# architectures entry -> family name at import time (megatron_spell/families.py is the registry).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    a: f.name for f in FAMILIES.values() for a in f.architectures
}
_VOCAB_DIVISIBLE_BY = 128  # Megatron's make_vocab_size_divisible_by default
_LLAMA3_MEGATRON_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no TE" (ImportError, CUDA errors)
        return False
    return torch.cuda.is_available()


def use_transformer_engine(backend: str) -> bool:
    """Whether `model.attention_backend` picks Transformer Engine's layer spec and attention.

    "local": never; "auto": when TE imports and CUDA is available; "te": required (a ValueError
    naming the setting when TE does not import or there is no CUDA).
    """
    if backend == "local":
        return False
    available = _have_transformer_engine()
    if backend == "te" and not available:
        raise ValueError(
            "config model.attention_backend='te': Transformer Engine does not import here (or no "
            "CUDA device); install transformer_engine on the GPU machine, or set "
            "model.attention_backend=auto (or local)"
        )
    return available


def load_hf_config(hf_dir: str | Path) -> Any:
    """Load an HF config.json from a model directory; ValueError if it is missing or unsupported."""
    from transformers import AutoConfig

    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"HF model directory {str(path)!r} has no config.json; pass a model directory"
        )
    cfg = AutoConfig.from_pretrained(path)
    family_of(cfg, check_flags=False)  # fail early on unsupported architectures
    return cfg


def padded_vocab_size(hf_config: Any, tp: int) -> int:
    """Megatron's vocab size for `hf_config` at tensor-parallel size `tp` (padded only if needed)."""
    vocab = int(hf_config.vocab_size)
    if vocab % tp == 0:
        return vocab
    multiple = _VOCAB_DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


# --- RoPE ------------------------------------------------------------------------------------------


def rope_settings(hf_config: Any) -> dict[str, Any]:
    """GPTModel RoPE kwargs (and yarn config attributes under "yarn") from an HF config.

    Handles transformers 5 (`rope_parameters`) and older (`rope_theta` + `rope_scaling`) layouts.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or params)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    out: dict[str, Any] = {
        "position_embedding_type": "rope",
        "rotary_base": float(theta),
        "rotary_percent": float(
            params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
            or 1.0
        ),
        "seq_len_interpolation_factor": None,
        "rope_scaling": False,
        "rope_scaling_factor": 8.0,
    }
    if rope_type == "default":
        return out
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        out["seq_len_interpolation_factor"] = factor
    elif rope_type == "llama3":
        for key, megatron_value in _LLAMA3_MEGATRON_DEFAULTS.items():
            if float(scaling.get(key, megatron_value)) != float(megatron_value):
                raise ValueError(
                    f"rope_scaling llama3 with {key}={scaling.get(key)} is not supported: "
                    f"Megatron-Core hard-codes {key}={megatron_value}"
                )
        out.update(rope_scaling=True, rope_scaling_factor=factor)
    elif rope_type == "yarn":
        if scaling.get("attention_factor") is not None:
            raise ValueError("rope_scaling yarn with an explicit attention_factor is not supported")
        out["position_embedding_type"] = "yarn"
        out["yarn"] = {
            "yarn_rotary_scaling_factor": factor,
            "yarn_original_max_position_embeddings": int(
                scaling.get("original_max_position_embeddings") or hf_config.max_position_embeddings
            ),
            "yarn_beta_fast": float(scaling.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(scaling.get("beta_slow") or 1.0),
            "yarn_mscale": float(scaling.get("mscale") or 1.0),
            "yarn_mscale_all_dim": float(scaling.get("mscale_all_dim") or 0.0),
            "yarn_correction_range_round_to_int": bool(scaling.get("truncate", True)),
        }
    else:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: default, linear, "
            "llama3 (Megatron's fixed low/high freq factors), yarn"
        )
    return out


# --- TransformerConfig -------------------------------------------------------------------------------


def _attention_fields(hf: Any, family: ModelFamily) -> dict[str, Any]:
    heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return {
        "num_attention_heads": heads,
        "num_query_groups": int(getattr(hf, "num_key_value_heads", None) or heads),
        "kv_channels": int(head_dim),
        "add_qkv_bias": family.qkv_bias,
        "qk_layernorm": family.qk_norm,
        "attention_dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0),
    }


def _moe_fields(hf: Any, family: ModelFamily) -> dict[str, Any]:
    pattern = family.moe_layer_pattern(hf)
    return {
        "num_moe_experts": family.num_experts(hf),
        "moe_router_topk": family.moe_topk(hf),
        "moe_ffn_hidden_size": family.moe_ffn_hidden_size(hf),
        # norm_topk_prob: softmax over the top-k logits == renormalised top-k of the full softmax.
        "moe_router_pre_softmax": not family.norm_topk_prob(hf),
        "moe_router_score_function": "softmax",
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "none",  # RL: no auxiliary loss by default
        "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": _have_transformer_engine(),
        "moe_layer_freq": 1 if all(pattern) else pattern,
    }


def _parallel_fields(parallel: ParallelConfig, dtype: torch.dtype) -> dict[str, Any]:
    tp = parallel.tensor_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    cuda = torch.cuda.is_available()
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": vpp if vpp and vpp > 1 else None,
        "context_parallel_size": parallel.context_parallel_size,
        "expert_model_parallel_size": parallel.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallel.expert_tensor_parallel_size or tp,
        "sequence_parallel": bool(parallel.sequence_parallel),
        "pipeline_dtype": dtype,
        "variable_seq_lengths": True,  # packed RL micro-batches differ in length
        # Megatron rejects variable_seq_lengths with its default allgather dispatcher, even for dense.
        "moe_token_dispatcher_type": "alltoall",
        "batch_p2p_comm": cuda,  # batched p2p on gloo: silently wrong loss with VPP
        "use_cpu_initialization": not cuda,
    }


def transformer_config_from_hf(
    hf_config: Any,
    parallel: ParallelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> TransformerConfig:
    """Map a supported HF config (+ parallel layout) to Megatron's TransformerConfig.

    `overrides` replace any TransformerConfig field (for example recompute_granularity="full",
    moe_aux_loss_coeff=1e-3); an unknown field name is a ValueError.
    """
    hf = hf_config
    family = family_of(hf)  # also rejects the HF flags the family cannot express
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    fields: dict[str, Any] = {
        "num_layers": int(hf.num_hidden_layers),
        "hidden_size": int(hf.hidden_size),
        "ffn_hidden_size": int(hf.intermediate_size),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.rms_norm_eps),
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "init_method_std": float(getattr(hf, "initializer_range", 0.02)),
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "attention_softmax_in_fp32": True,
        "apply_rope_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "cross_entropy_loss_fusion": False,
        **_attention_fields(hf, family),
        **_parallel_fields(parallel, dtype),
    }
    if family.is_moe(hf):
        fields.update(_moe_fields(hf, family))
    valid = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown TransformerConfig override(s) {unknown}; check the field names")
    fields.update(overrides)
    config = TransformerConfig(**fields)
    for key, value in rope_settings(hf).get("yarn", {}).items():
        setattr(config, key, value)  # GPTModel reads the yarn_* settings as config attributes
    return config


# --- layer spec and model ----------------------------------------------------------------------------


def _with_core_attention(spec: ModuleSpec, core_attention: Any) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def layer_spec(
    config: TransformerConfig,
    *,
    core_attention: Any = None,
    vp_stage: int | None = None,
    use_te: bool | None = None,
) -> Any:
    """The transformer layer spec for `config` (TE if `use_te`, None: when available; else local).

    core_attention: a module class replacing the spec's core attention (DotProductAttention or
    TEDotProductAttention), constructed by Megatron with the same arguments. Returns a ModuleSpec when all
    layers are alike, or the TransformerBlockSubmodules of pipeline stage (`vp_stage`) for mixed
    dense/MoE layers.
    """
    use_te = _have_transformer_engine() if use_te is None else use_te
    if isinstance(config.moe_layer_freq, list) and config.num_moe_experts:
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
        )
        if core_attention is not None:
            block.layer_specs = [_with_core_attention(s, core_attention) for s in block.layer_specs]
        return block
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=False,
            qk_layernorm=config.qk_layernorm,
            normalization="RMSNorm",
        )
    return spec if core_attention is None else _with_core_attention(spec, core_attention)


def _norms_in_params_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The local spec's norms (`WrappedTorchNorm` builds `torch.nn.RMSNorm` / `LayerNorm` without a
    dtype) hold fp32 weights in a bf16 model; Megatron's mixed-precision optimizer then keeps them out
    of its float16 groups, and its `sharded_state_dict` cannot map their state ("Param id N does not
    match any model sharded param": no bf16 checkpoint could be saved). Transformer Engine's norms are
    in `params_dtype`, as HF's and vLLM's are: the local ones are cast to it too (in place, so
    attributes such as `sequence_parallel` stay)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(dtype)


GPU_FUSIONS = {
    "gradient_accumulation_fusion": True,
    "bias_activation_fusion": True,
    "bias_dropout_fusion": True,
    "apply_rope_fusion": True,
    "masked_softmax_fusion": True,
}
"""Megatron's fused kernels as the anchors train with them (Megatron-Bridge and verl's Megatron
engine turn them on): weight-gradient accumulation straight into the fp32 main grads, fused bias +
activation, bias + dropout + add, RoPE. They need CUDA and Transformer Engine (its fused RoPE and
its wgrad GEMM); without either every fusion stays off (the CPU tests, the local spec on a GPU)."""


def gpu_fusions(use_te: bool) -> dict[str, bool]:
    """The TransformerConfig fusion fields for this process: `GPU_FUSIONS` with TE on CUDA, else {}."""
    return dict(GPU_FUSIONS) if use_te and torch.cuda.is_available() else {}


def build_model(
    hf_config: Any,
    ctx: ParallelContext,
    *,
    dtype: torch.dtype = torch.float32,
    core_attention: Any = None,
    config_overrides: dict[str, Any] | None = None,
    use_te: bool | None = None,
) -> list[GPTModel]:
    """Build this rank's GPTModel chunks (one per virtual pipeline stage) for `hf_config`.

    `use_te`: Transformer Engine's layer spec (see `use_transformer_engine`); None: when available.

    Weights are randomly initialised; load a checkpoint into them (megatron_spell.mcore.checkpoint).
    """
    use_te = _have_transformer_engine() if use_te is None else use_te
    config = transformer_config_from_hf(
        hf_config,
        ctx.parallel_config,
        dtype=dtype,
        **{**gpu_fusions(use_te), **(config_overrides or {})},
    )
    rope = {k: v for k, v in rope_settings(hf_config).items() if k != "yarn"}
    vocab = padded_vocab_size(hf_config, ctx.tp)
    tied = tied_embeddings(hf_config)
    chunks = []
    for stage in range(ctx.vpp):
        vp_stage = stage if ctx.vpp > 1 else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(
                config, core_attention=core_attention, vp_stage=vp_stage, use_te=use_te
            ),
            vocab_size=vocab,
            max_sequence_length=int(hf_config.max_position_embeddings),
            pre_process=ctx.holds_first_stage(vp_stage),
            post_process=ctx.holds_last_stage(vp_stage),
            share_embeddings_and_output_weights=tied,
            pg_collection=ctx.pg_collection,
            vp_stage=vp_stage,
            **rope,
        )
        _norms_in_params_dtype(model, config.params_dtype)
        if torch.cuda.is_available():
            model = model.cuda(torch.cuda.current_device())
        chunks.append(model)
    logger.info(
        "built %d GPTModel chunk(s): %s, %d layers, tied=%s, vocab=%d",
        len(chunks),
        family_of(hf_config).name,
        config.num_layers,
        tied,
        vocab,
    )
    return chunks
