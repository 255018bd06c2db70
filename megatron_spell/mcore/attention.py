"""Core attention for Megatron's local layer spec with THD packing and exact context parallelism.

Megatron-Core's local `DotProductAttention` rejects packed sequences and context parallelism
(docs/platform.md, "Traps"); only Transformer Engine supports them. `PackedCPAttention` is a drop-in
core-attention module (same constructor and `forward(query, key, value, attention_mask,
attn_mask_type, attention_bias, packed_seq_params)` signature) that supports both, causal only:

- THD (`packed_seq_params.qkv_format == "thd"`): q/k/v are [t, heads, dim]; every sequence of the pack
  (boundaries from `cu_seqlens_q_padded`, else `cu_seqlens_q`) attends causally to itself only. Sequences are
  processed one at a time, so no [t, t] mask of the whole pack is ever built. Padding sits at the end of each
  sequence, so under a causal mask it never influences real tokens.
- Context parallelism (cp > 1): each CP rank holds chunks r and 2*cp-1-r of every sequence (the load-balanced
  layout of `packing.cp_split_index`, also used by Megatron's THD RoPE). K and V are all-gathered over the CP
  group (autograd-correct: the backward reduce-scatters dK/dV), each sequence's full K/V is reassembled, and
  each local query chunk attends to the key prefix that ends at its own last position with a lower-right
  aligned causal mask (`torch.nn.attention.bias.causal_lower_right`, which fused GPU kernels accept).
- SBHD input ([s, b, heads, dim], no packing) is treated as b sequences of length s (times cp under CP).

Attention itself is `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on
GPU, the math kernel on CPU). Grouped-query attention expands the KV heads. `attention_mask` is ignored: the
mask is always causal per sequence (padding is handled by packing), which is all the GPT models here need.

Shared prefix (`packing` module docstring): `SharedPrefixSeqParams.unit_segments` gives, per packed
sequence (unit), the boundaries of its segments: segment 0 is the prompt stored once, every later segment
(a response, or the padding) sees segment 0 and itself, causally, and never a sibling; the mask is
`shared_prefix_mask` (segment ids and positions). It is applied block by block: the queries of one segment
inside one local chunk see a contiguous key prefix of [prompt ; own segment], so each block is one SDPA
call with a lower-right causal mask (no [t, t] mask, no sibling keys computed). Under CP each rank keeps
its two load-balanced chunks of the unit and gathers the unit's full K/V, so every response query sees the
whole prompt. Per layer a CP rank holds its (P - 1 + sum R) / cp queries and the K/V of the whole unit
(P - 1 + sum R tokens, GQA-expanded to all heads, as for an ordinary sequence of that length), plus one
transient [prompt ; segment] K/V copy per block. RoPE takes explicit per-token positions
(`set_rope_positions`): every response continues from the end of the prompt.

Deviation: the all-gather CP keeps the full K/V of each sequence on every CP rank (O(L) memory per layer, like
Megatron's `cp_comm_type="all_gather"`), not a ring; with Transformer Engine, Megatron's own TE attention and
CP are used instead (see `core_attention_class`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.bias import causal_lower_right

from megatron_spell.mcore.packing import cp_split_index


@dataclass
class SharedPrefixSeqParams(PackedSeqParams):
    """`PackedSeqParams` plus, per unit, its segment boundaries (`MicroBatch.unit_segments`)."""

    unit_segments: tuple[tuple[int, ...], ...] | None = None


def set_rope_positions(model: torch.nn.Module, positions: torch.Tensor | None) -> None:
    """Make the rotary embeddings of `model` use explicit per-token positions for the next forward.

    `positions` is the int64 [padded pack] RoPE position of every token of the unsplit pack (None:
    Megatron's own positions, 0.. in every packed sequence). Megatron's THD RoPE
    (`_apply_rotary_pos_emb_thd`) accepts frequencies for the whole packed batch (one row per packed
    token, "has_packed_freqs") and picks each CP rank's load-balanced chunks from them; the patched
    `RotaryEmbedding.forward` returns exactly that table. Needs the unfused RoPE (the model builder
    sets `apply_rope_fusion=False`).
    """
    for m in model.modules():
        if not isinstance(m, RotaryEmbedding):
            continue
        if not hasattr(m, "_packed_positions"):
            m.forward = _positioned_rope_forward(m, m.forward)
        m._packed_positions = positions
        m._packed_max = int(positions.max()) + 1 if positions is not None else 0


def _positioned_rope_forward(module, orig):
    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        positions = module._packed_positions
        if positions is None:
            return orig(max_seq_len, offset, packed_seq, cp_group)
        # packed_seq=True: the full table, not CP-sliced (THD RoPE selects the local chunks)
        out = orig(max(module._packed_max, max_seq_len), 0, True, cp_group)
        emb = out[0] if isinstance(out, tuple) else out
        emb = emb[positions.to(emb.device)]
        return (emb, *out[1:]) if isinstance(out, tuple) else emb

    return forward


class _AllGatherCP(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        n = grad.size(0) // world
        if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter
            dist.all_reduce(grad, group=group)
            return grad[rank * n : (rank + 1) * n].clone(), None
        out = torch.empty((n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def _seq_bounds(packed_seq_params, total: int) -> list[int]:
    if packed_seq_params is None:
        return [0, total]
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    return [int(c) for c in cu.tolist()] if cu is not None else [0, total]


def _sdpa(q, k, v, *, scale, dropout, causal_offset):
    """q [lq, h, d], k/v [lk, h, d] -> [lq, h, d]; query i sees keys <= i + causal_offset."""
    q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))
    lq, lk = q.size(2), k.size(2)
    if causal_offset == 0 and lq == lk:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, dropout_p=dropout
        )
    else:
        assert lk == lq + causal_offset
        mask = causal_lower_right(lq, lk)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout
        )
    return out.squeeze(0).permute(1, 0, 2)


def key_ranges(segs: Sequence[int], segment: int, end: int) -> list[tuple[int, int]]:
    """Keys (unit positions, as [a, b) ranges) that a query of `segment` at unit positions < `end` may
    see: the shared prompt (segment 0) and its own segment up to `end`, never a sibling response."""
    if segment == 0:
        return [(segs[0], end)]
    prompt = (segs[0], segs[1])
    own = (segs[segment], end)
    return [prompt, own] if prompt[1] > prompt[0] else [own]


def _query_pieces(segs: Sequence[int], qa: int, qb: int):
    """Split the unit positions [qa, qb) of a query chunk by segment (boundaries `segs`, relative to the
    unit start): (piece start, piece end, key ranges). Within a piece every query sees a contiguous key
    suffix ending at its own position, so the lower-right causal mask of `_sdpa` is exact."""
    for i, (a, b) in enumerate(zip(segs[:-1], segs[1:])):
        pa, pb = max(a, qa), min(b, qb)
        if pa < pb:
            yield pa, pb, key_ranges(segs, i, pb)


def shared_prefix_mask(
    seg_q: torch.Tensor, pos_q: torch.Tensor, seg_k: torch.Tensor, pos_k: torch.Tensor
) -> torch.Tensor:
    """Boolean [q, k] mask of a shared unit (True = attend) from segment ids (prompt 0, response i,
    padding last) and RoPE positions: causal in position, and a key is visible when it is in the
    prompt or in the query's own segment. `PackedCPAttention` computes exactly this mask block by
    block (`key_ranges`) without building it; tests use it as the reference."""
    causal = pos_k[None, :] <= pos_q[:, None]
    same = (seg_k[None, :] == 0) | (seg_k[None, :] == seg_q[:, None])
    return causal & same


class PackedCPAttention(MegatronModule):
    """Drop-in core attention for the local spec: causal, THD packing, exact context parallelism,
    shared-prefix units (`SharedPrefixSeqParams.unit_segments`)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(
                f"PackedCPAttention is causal only, got attn_mask_type={attn_mask_type}"
            )
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layer_number = max(1, layer_number)
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _cp_size(self) -> int:
        return 1 if self.cp_group is None else dist.get_world_size(self.cp_group)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("PackedCPAttention does not support attention_bias")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            out = self._forward_thd(query, key, value, packed_seq_params)  # [t, h, d]
            return out.reshape(out.size(0), -1)
        # SBHD: [s, b, h, d] -> run each batch element as one sequence.
        s, b = query.shape[:2]
        outs = [self._forward_thd(query[:, i], key[:, i], value[:, i], None) for i in range(b)]
        return torch.stack(outs, dim=1).reshape(s, b, -1)

    def _forward_thd(self, q, k, v, packed_seq_params):
        groups = q.size(1) // k.size(1)
        cp = self._cp_size()
        dropout = self.dropout if self.training else 0.0
        bounds = _seq_bounds(packed_seq_params, q.size(0) * cp)
        segments = getattr(packed_seq_params, "unit_segments", None)
        if segments is None:
            segments = [(0, end - start) for start, end in zip(bounds[:-1], bounds[1:])]
        if cp > 1:
            k, v = self._gather_kv(k, v, bounds, cp)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        rank = dist.get_rank(self.cp_group) if cp > 1 else 0
        outs = []
        for start, end, segs in zip(bounds[:-1], bounds[1:], segments):
            length = end - start
            if length == 0:
                continue
            # local query chunks: (index in local q, first and last+1 unit position)
            if cp == 1:
                chunks = [(start, 0, length)]
            else:
                chunk = length // (2 * cp)
                local_start = start // cp
                chunks = [
                    (local_start + j * chunk, c * chunk, (c + 1) * chunk)
                    for j, c in enumerate((rank, 2 * cp - 1 - rank))
                ]
            for q_at, qa, qb in chunks:
                for pa, pb, key_ranges in _query_pieces(segs, qa, qb):
                    q_p = q[q_at + pa - qa : q_at + pb - qa]
                    ks = [k[start + a : start + b] for a, b in key_ranges]
                    vs = [v[start + a : start + b] for a, b in key_ranges]
                    k_p = ks[0] if len(ks) == 1 else torch.cat(ks)
                    v_p = vs[0] if len(vs) == 1 else torch.cat(vs)
                    outs.append(
                        _sdpa(
                            q_p,
                            k_p,
                            v_p,
                            scale=self.softmax_scale,
                            dropout=dropout,
                            causal_offset=k_p.size(0) - q_p.size(0),
                        )
                    )
        return torch.cat(outs, dim=0)

    def _gather_kv(self, k, v, bounds, cp):
        """All-gather local K/V over CP and put them back in unsplit pack order: [total, g, d] each."""
        kv = torch.cat([k, v], dim=-1)
        gathered = _AllGatherCP.apply(kv, self.cp_group)  # [cp * t_local, g, 2d]
        order = torch.cat([cp_split_index(bounds, cp, r) for r in range(cp)])
        full = gathered[
            torch.argsort(order).to(kv.device)
        ]  # gathered[i] sits at pack position order[i]
        d = k.size(-1)
        return full[..., :d], full[..., d:]


def core_attention_class(use_te: bool) -> type[PackedCPAttention] | None:
    """The core-attention module for the layer spec: None with Transformer Engine's spec (keep TE's own,
    with its THD and CP support; `model.use_transformer_engine` decides), else ours."""
    return None if use_te else PackedCPAttention
