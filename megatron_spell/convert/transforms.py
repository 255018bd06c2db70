"""Pure tensor transforms between Hugging Face and Megatron-Core weight layouts.

Every function here is a pure function of full (unsharded) tensors; none touches torch.distributed or
megatron. Layouts:

- Attention QKV. HF stores `q_proj [nq*d, H]`, `k_proj [nkv*d, H]`, `v_proj [nkv*d, H]`. Megatron's fused
  `linear_qkv [(nq + 2*nkv)*d, H]` is ordered per KV group g: `[q heads of group g (nq/nkv of them), k_g, v_g]`,
  so that a contiguous split along dim 0 over tensor-parallel ranks gives each rank whole groups. The same
  ordering applies to the bias (dim 0 only).
- Gated MLP. Megatron's `linear_fc1 [2*I, H]` is `[gate; up]` (the first half goes through the activation).
  Under tensor parallelism each rank holds `[gate_r; up_r]`; `merge_tp_shards` rebuilds the full layout.
- MoE experts. HF has two layouts: per expert `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`
  (what transformers 5.x `save_pretrained` writes by default: it reverts its in-memory fusion) and the fused
  `mlp.experts.gate_up_proj [E, 2*I, H]` / `mlp.experts.down_proj [E, H, I]` (transformers 5.x in memory, some
  checkpoints). Both are read; `split_fused_experts` turns the fused one into per-expert tensors.
"""

from __future__ import annotations

import torch


def _check_dim0(name: str, tensor: torch.Tensor, expected: int) -> None:
    if tensor.shape[0] != expected:
        raise ValueError(
            f"{name}: dim 0 is {tensor.shape[0]} but the config implies {expected} "
            f"(shape {tuple(tensor.shape)}); does the checkpoint match config.json?"
        )


def qkv_fuse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """HF q/k/v (weight `[n*d, H]` or bias `[n*d]`) -> Megatron `linear_qkv` per-group interleave."""
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads={num_heads} is not a multiple of KV heads={num_kv_heads}"
        )
    _check_dim0("q_proj", q, num_heads * head_dim)
    _check_dim0("k_proj", k, num_kv_heads * head_dim)
    _check_dim0("v_proj", v, num_kv_heads * head_dim)
    rest = q.shape[1:]
    per_group = num_heads // num_kv_heads
    qg = q.reshape(num_kv_heads, per_group * head_dim, *rest)
    kg = k.reshape(num_kv_heads, head_dim, *rest)
    vg = v.reshape(num_kv_heads, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def qkv_split(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_fuse`: Megatron `linear_qkv` weight or bias -> HF (q, k, v)."""
    _check_dim0("linear_qkv", qkv, (num_heads + 2 * num_kv_heads) * head_dim)
    rest = qkv.shape[1:]
    per_group = num_heads // num_kv_heads
    g = qkv.reshape(num_kv_heads, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def gate_up_fuse(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj/up_proj `[I, H]` -> Megatron `linear_fc1 [2I, H]` = `[gate; up]`."""
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0)


def gate_up_split(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `gate_up_fuse`."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 dim 0 ({fc1.shape[0]}) is odd; a gated MLP needs [gate; up]")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def split_fused_experts(
    gate_up: torch.Tensor | None, down: torch.Tensor | None, num_experts: int
) -> list[tuple[int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """HF fused experts (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) -> per expert (e, gate, up, down).

    Either argument may be None (they arrive as separate tensors when streaming); that part is None in
    the result. Views only: no copy of the whole fused tensor is made.
    """
    out = []
    for e in range(num_experts):
        gate = up = dn = None
        if gate_up is not None:
            _check_dim0("experts.gate_up_proj", gate_up, num_experts)
            gate, up = torch.chunk(gate_up[e], 2, dim=0)
        if down is not None:
            _check_dim0("experts.down_proj", down, num_experts)
            dn = down[e]
        out.append((e, gate, up, dn))
    return out


def fuse_experts(
    gates: list[torch.Tensor], ups: list[torch.Tensor], downs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert HF tensors -> fused (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`)."""
    gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gates, ups, strict=True)])
    return gate_up, torch.stack(downs)


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Pad an embedding / output matrix `[V, H]` with zero rows up to Megatron's padded vocab size."""
    if padded_rows < weight.shape[0]:
        raise ValueError(
            f"vocab rows {weight.shape[0]} exceed the Megatron model's padded vocab {padded_rows}"
        )
    if padded_rows == weight.shape[0]:
        return weight
    pad = weight.new_zeros((padded_rows - weight.shape[0], *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def merge_tp_shards(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Rebuild a full Megatron tensor from its tensor-parallel shards (rank order).

    kind: "column" (split on dim 0: linear_qkv, embeddings, output_layer), "row" (dim 1: linear_proj,
    linear_fc2), "gated_column" (linear_fc1 of a gated MLP: each rank holds `[gate_r; up_r]`),
    "replicated" (norms, router; returns shard 0).
    """
    if kind == "column":
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "gated_column":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if kind == "replicated":
        return shards[0]
    raise ValueError(
        f"unknown TP shard kind {kind!r}; expected column, row, gated_column, replicated"
    )
