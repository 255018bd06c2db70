"""PackedCPAttention (no CP) against a naive per-sequence causal softmax attention written out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_spell.mcore.attention import PackedCPAttention

pytestmark = pytest.mark.usefixtures("megatron_on_cpu")


def naive_causal(q, k, v):
    """q [s, h, d], k/v [s, g, d] -> [s, h*d] with explicit GQA expansion and a causal mask."""
    h, g = q.size(1), k.size(1)
    k = k.repeat_interleave(h // g, dim=1)
    v = v.repeat_interleave(h // g, dim=1)
    scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(q.size(-1))
    s = q.size(0)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hst,thd->shd", scores.softmax(-1), v)
    return out.reshape(s, -1)


def _module(heads=4, groups=2, dim=16):
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=dim,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )
    pgs = SimpleNamespace(tp=None, cp=None)
    return PackedCPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_thd_equals_per_sequence_attention(groups):
    g = torch.Generator().manual_seed(groups)
    cu = [0, 5, 12, 12 + 9]
    t = cu[-1]
    q = torch.randn(t, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, groups, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, groups, 16, generator=g, dtype=torch.float64, requires_grad=True)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32),
        max_seqlen_q=9,
        max_seqlen_kv=9,
    )
    out = _module(groups=groups)(q, k, v, None, packed_seq_params=params)
    ref = torch.cat([naive_causal(q[a:b], k[a:b], v[a:b]) for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def test_sbhd_batch_equals_naive():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 3, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(7, 3, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(7, 3, 2, 16, generator=g, dtype=torch.float64)
    out = _module()(q, k, v, None)
    assert out.shape == (7, 3, 64)
    for b in range(3):
        torch.testing.assert_close(out[:, b], naive_causal(q[:, b], k[:, b], v[:, b]))
