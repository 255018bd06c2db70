"""A Megatron-Core GPTModel built directly from megatron.core APIs, without megatron_spell's model/convert code.

Used to show that converted checkpoints carry Megatron-Core's standard keys: the TransformerConfig is
written out here field by field from the HF config (Llama / Qwen2 / Qwen3 / Qwen3-MoE), the layer spec is
`get_gpt_layer_local_spec`, and loading goes through `dist_checkpointing.load` + `load_state_dict` as
Megatron-LM does. Only `apply_cpu_patches` (platform necessity) comes from megatron_spell.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def plain_gpt_model(hf_config: Any, *, pre_process: bool = True, post_process: bool = True) -> Any:
    """GPTModel(TransformerConfig written here, local spec) for the current parallel_state layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    num_experts = getattr(hf_config, "num_experts", None) or None
    qk_norm = hf_config.model_type in ("qwen3", "qwen3_moe")
    moe: dict[str, Any] = {}
    if num_experts:
        moe = dict(
            num_moe_experts=num_experts,
            moe_router_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not hf_config.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        )
    config = TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
        qk_layernorm=qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, qk_layernorm=qk_norm, normalization="RMSNorm"
    )
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return GPTModel(
        config,
        spec,
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=hf_config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(theta),
    )


def load_plain(model: Any, release_dir: str) -> None:
    """Megatron-LM's way: dist_checkpointing.load(model.sharded_state_dict()) then load_state_dict."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, release_dir)
    model.load_state_dict(state["model"], strict=True)
