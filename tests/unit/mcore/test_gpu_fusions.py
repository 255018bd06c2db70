"""`mcore.model.gpu_fusions`: Megatron's fusions on CUDA with Transformer Engine, off elsewhere."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig

from megatron_spell.config import ParallelConfig
from megatron_spell.mcore import model


def test_fusions_only_with_te_on_cuda(monkeypatch):
    assert model.gpu_fusions(use_te=True) == {}  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model.gpu_fusions(use_te=False) == {}  # the local spec on a GPU: TE's kernels missing
    assert model.gpu_fusions(use_te=True) == model.GPU_FUSIONS
    assert model.GPU_FUSIONS["gradient_accumulation_fusion"] is True


def test_every_fusion_is_a_transformer_config_field():
    """The names are Megatron's (a typo would be an "unknown override" at the first GPU build);
    building them needs TE (Megatron refuses apply_rope_fusion without it), so only the names here."""
    from megatron.core.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(model.GPU_FUSIONS) <= fields
    hf = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
        model.transformer_config_from_hf(hf, ParallelConfig(), **model.GPU_FUSIONS)
