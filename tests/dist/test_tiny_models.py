"""Tests for tests/helpers/tiny_models.py: the tiny HF models load in transformers with their tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_hf_model


@pytest.mark.parametrize(
    ("family", "tied"),
    [("llama", True), ("qwen2", False), ("qwen3", True), ("qwen3_moe", False)],
)
def test_tiny_model_loads_in_transformers(tmp_path: Path, family: str, tied: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = make_tiny_hf_model(tmp_path / family, family, tied=tied, seed=1)
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = model.config
    assert cfg.model_type == family
    assert cfg.vocab_size >= len(tok)
    assert getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) >= 32
    assert cfg.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    assert next(model.parameters()).dtype == torch.float32

    text = tok.apply_chat_template(
        [{"role": "user", "content": "Where does chapter one begin?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # not a near-uniform distribution

    names = {n for n, _ in model.named_parameters()}
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    if family in ("qwen3", "qwen3_moe"):
        assert "model.layers.0.self_attn.q_norm.weight" in names
    if family == "qwen3_moe":
        assert cfg.num_experts == 4 and cfg.num_experts_per_tok == 2 and cfg.norm_topk_prob


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(make_tiny_hf_model(tmp_path / "a", "qwen3", seed=3) / "model.safetensors")
    b = load_file(make_tiny_hf_model(tmp_path / "b", "qwen3", seed=3) / "model.safetensors")
    c = load_file(make_tiny_hf_model(tmp_path / "c", "qwen3", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)
