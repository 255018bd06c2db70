"""Converter tables and transforms without Megatron: layouts against hand-built references, round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from megatron_spell.convert import (
    expected_megatron_names,
    get_family,
    hf_to_megatron_state_dict,
    megatron_to_hf,
)
from megatron_spell.convert import transforms as T
from megatron_spell.convert.hf_io import iter_hf_tensors
from tests.helpers.tiny_models import make_tiny_hf_model


def test_qkv_fuse_matches_per_group_reference():
    nq, nkv, d, h = 6, 2, 4, 5
    q, k, v = (torch.randn(n * d, h) for n in (nq, nkv, nkv))
    # Reference built head by head: group g = [q heads g*3 .. g*3+2, k head g, v head g].
    rows = []
    for g in range(nkv):
        for j in range(nq // nkv):
            rows.append(q[(g * (nq // nkv) + j) * d : (g * (nq // nkv) + j + 1) * d])
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    ref = torch.cat(rows)
    fused = T.qkv_fuse(q, k, v, nq, nkv, d)
    assert torch.equal(fused, ref)
    q2, k2, v2 = T.qkv_split(fused, nq, nkv, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # Bias (1-D) follows the same layout.
    qb, kb, vb = (torch.randn(n * d) for n in (nq, nkv, nkv))
    groups = [
        torch.cat([qb.view(nkv, -1)[g], kb.view(nkv, -1)[g], vb.view(nkv, -1)[g]])
        for g in range(nkv)
    ]
    assert torch.equal(T.qkv_fuse(qb, kb, vb, nq, nkv, d), torch.cat(groups))


def test_qkv_shape_errors_name_the_tensor():
    with pytest.raises(ValueError, match="k_proj"):
        T.qkv_fuse(torch.zeros(8, 4), torch.zeros(3, 4), torch.zeros(4, 4), 2, 1, 4)


def test_gate_up_and_tp_merge():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = T.gate_up_fuse(gate, up)
    g2, u2 = T.gate_up_split(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    # TP=2 shards of a gated fc1 are [gate_r; up_r]; merging them gives [gate; up].
    shards = [torch.cat([gate[r * 4 : (r + 1) * 4], up[r * 4 : (r + 1) * 4]]) for r in range(2)]
    assert torch.equal(T.merge_tp_shards("gated_column", shards), fc1)
    assert torch.equal(T.merge_tp_shards("row", [fc1[:, :1], fc1[:, 1:]]), fc1)


def test_fused_experts_split_and_fuse():
    gates = [torch.randn(4, 3) for _ in range(2)]
    ups = [torch.randn(4, 3) for _ in range(2)]
    downs = [torch.randn(3, 4) for _ in range(2)]
    gu, dn = T.fuse_experts(gates, ups, downs)
    assert gu.shape == (2, 8, 3) and dn.shape == (2, 3, 4)
    for e, g, u, d in T.split_fused_experts(gu, dn, 2):
        assert torch.equal(g, gates[e]) and torch.equal(u, ups[e]) and torch.equal(d, downs[e])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    specs = {
        "llama": ("llama", False),
        "qwen2": ("qwen2", False),
        "qwen3_tied": ("qwen3", True),
        "qwen3_moe": ("qwen3_moe", False),
    }
    return {k: make_tiny_hf_model(root / k, fam, tied=tied) for k, (fam, tied) in specs.items()}


@pytest.mark.parametrize("which", ["llama", "qwen2", "qwen3_tied", "qwen3_moe"])
def test_hf_megatron_hf_roundtrip_is_bit_exact(tiny_dirs, which):
    cfg = AutoConfig.from_pretrained(tiny_dirs[which])
    hf = dict(iter_hf_tensors(tiny_dirs[which]))
    mg = dict(hf_to_megatron_state_dict(iter(hf.items()), cfg, padded_vocab_size=640))
    assert sorted(mg) == sorted(expected_megatron_names(cfg))
    assert mg["embedding.word_embeddings.weight"].shape[0] == 640
    back = {}
    for name, t in mg.items():
        for hn, ht in megatron_to_hf(name, t, cfg):
            back[hn] = ht
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_moe_fused_hf_layout_reads_like_per_expert(tiny_dirs):
    """transformers' in-memory fused experts (`mlp.experts.gate_up_proj` / `down_proj`) convert to the
    same Megatron tensors as the per-expert tensors it writes to disk."""
    from transformers import AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"])
    hf = dict(iter_hf_tensors(tiny_dirs["qwen3_moe"]))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in hf  # what transformers writes
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen3_moe"], dtype=torch.float32)
    fused = {k: v for k, v in model.state_dict().items() if k.endswith(("_up_proj", "down_proj"))}
    assert sorted(fused) == sorted(
        f"model.layers.{i}.mlp.experts.{n}"
        for i in range(cfg.num_hidden_layers)
        for n in ("gate_up_proj", "down_proj")
    )
    rest = {k: v for k, v in hf.items() if ".mlp.experts." not in k}
    a = dict(hf_to_megatron_state_dict(iter(hf.items()), cfg))
    b = dict(hf_to_megatron_state_dict(iter({**rest, **fused}.items()), cfg))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_megatron_aliases_map_like_local_names(tiny_dirs):
    cfg = AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"])
    t = torch.randn(128)
    assert megatron_to_hf(
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", t, cfg
    ) == [("model.layers.1.input_layernorm.weight", t)]
    w = torch.randn(128, 128)
    (g_name, _), (u_name, _) = megatron_to_hf(
        "decoder.layers.0.mlp.experts.linear_fc1.weight3", w, cfg
    )
    assert g_name == "model.layers.0.mlp.experts.3.gate_proj.weight"
    assert u_name == "model.layers.0.mlp.experts.3.up_proj.weight"


def test_tied_lm_head_on_request(tiny_dirs):
    cfg = AutoConfig.from_pretrained(tiny_dirs["qwen3_tied"])
    emb = torch.randn(640, 128)
    out = megatron_to_hf("embedding.word_embeddings.weight", emb, cfg, include_tied_lm_head=True)
    assert [n for n, _ in out] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert all(t.shape == (512, 128) for _, t in out)


def test_unsupported_architecture_is_named():
    cfg = AutoConfig.for_model("gpt2")
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        get_family(cfg)
    with pytest.raises(ValueError, match="attention_bias"):
        get_family(LlamaConfig(attention_bias=True, architectures=["LlamaForCausalLM"]))


def test_bad_tensors_are_named(tiny_dirs):
    cfg = AutoConfig.from_pretrained(tiny_dirs["llama"])
    hf = dict(iter_hf_tensors(tiny_dirs["llama"]))
    missing = {k: v for k, v in hf.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.self_attention\.linear_qkv\.weight"):
        list(hf_to_megatron_state_dict(iter(missing.items()), cfg))
    extra = {**hf, "model.layers.7.mlp.up_proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="layer 7"):
        list(hf_to_megatron_state_dict(iter(extra.items()), cfg))
    bad = {**hf, "model.layers.0.self_attn.o_proj.weight": torch.zeros(128, 64)}
    shapes = {k: tuple(v.shape) for k, v in hf_to_megatron_state_dict(iter(hf.items()), cfg)}
    with pytest.raises(ValueError, match=r"o_proj.*\(128, 64\).*\(128, 128\)"):
        list(hf_to_megatron_state_dict(iter(bad.items()), cfg, expected_shapes=shapes))
    with pytest.raises(ValueError, match="no mapping"):
        list(hf_to_megatron_state_dict(iter({"foo.weight": torch.zeros(1)}.items()), cfg))


def test_canonical_names():
    from megatron_spell.convert import canonical_megatron_name as canon

    assert (
        canon("decoder.layers.1.mlp.experts.linear_fc1.weight3")
        == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    )
    assert canon("decoder.layers.2.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.2.pre_mlp_layernorm.weight"
    )
    assert canon("output_layer.weight") == "output_layer.weight"


def test_plain_safetensors_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_spell.convert.hf_io import _read_safetensors

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).bfloat16(),
        "c": torch.zeros(0, 3),
        "d": torch.arange(7),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    ref = load_file(tmp_path / "x.safetensors")
    got = dict(_read_safetensors(tmp_path / "x.safetensors"))
    assert set(got) == set(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
