"""Weight export: stream HF-named full tensors out of this rank's Megatron shards
(docs/architecture.md data flow, "export weights (PP/TP/EP gather, HF names) ->
rollout.load_weights").

`export_hf_weights(model_chunks, ctx, hf_config, bucket_mb=...)` yields buckets (lists of `(hf_name, tensor)`,
at most `bucket_mb` each unless a single tensor is larger) on EVERY rank, in the same order everywhere, so that
every rank can feed its colocated vLLM engine (each engine needs full tensors; vLLM slices its own rollout-TP
shard). Every rank must consume the whole stream: it drives collectives.

Per parameter, in pipeline-stage order (order of Megatron's own layer-wise export, cf.
`NVIDIA-NeMo/Megatron-Bridge:docs/bridge-tech-details.md` L160-183):
1. TP gather on the stage that owns it, per the param's own attributes: `partition_dim` 0 (column parallel:
   linear_qkv - whose shards are whole query groups, so concatenation gives Megatron's interleaved layout -,
   embeddings, output layer), 1 (row parallel: linear_proj, linear_fc2), gated linear_fc1 (each rank holds
   `[gate_r; up_r]`), or replicated. Expert params gather over the expert-TP group instead.
2. EP gather for expert params: local expert k of EP rank r is global expert `r * num_local + k`.
3. PP broadcast from the owning stage to all stages (shapes known from a metadata exchange up front).
4. The converter's per-tensor `megatron_to_hf` (QKV split, gate/up split, vocab padding cut).
Only one full tensor (plus its shards) and one bucket are alive at a time: the model is never materialised
twice. Tied embeddings: the last stage's `output_layer.weight` copy is skipped; the receiver adds
`lm_head.weight` from the embedding. Process groups come from the `ParallelContext`; this module reads no
`parallel_state` globals. Context-parallel ranks hold replicas and need nothing.

`write_hf_dir` writes the same stream as a Hugging Face directory (`checkpoint.export_hf`, the end of a
run): every rank drives the collectives, world rank 0 writes the safetensors shards as the tensors come,
so no rank holds more than one full tensor plus one output shard.

Aliasing: where nothing is gathered or cast (TP=1, replicated params) the yielded tensors are views of the
live Megatron parameters (zero-copy); a consumer that keeps them past the next optimizer step must copy.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_spell.convert import canonical_megatron_name, megatron_to_hf
from megatron_spell.convert.hf_io import ShardedSafetensorsWriter
from megatron_spell.convert.transforms import merge_tp_shards
from megatron_spell.families import find_family, tied_embeddings

if TYPE_CHECKING:
    from megatron_spell.mcore.parallel import ParallelContext

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$")
_GROUPED_EXPERT = re.compile(r"^(.*\.experts\.linear_fc[12]\.weight)(\d+)$")


@dataclass(frozen=True)
class ParamMeta:
    """One parameter as the owning stage describes it to all stages."""

    names: tuple[
        str, ...
    ]  # canonical Megatron name(s) with global layer index; one per global expert
    full_shape: tuple[int, ...]  # after TP gather
    dtype: torch.dtype
    kind: str  # merge_tp_shards kind
    expert: bool


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_kind(name: str, param: torch.Tensor, gated: bool) -> str:
    if not getattr(param, "tensor_model_parallel", False):
        return "replicated"
    if getattr(param, "partition_dim", 0) == 1:
        return "row"
    if gated and "linear_fc1.weight" in name:  # also grouped experts' `linear_fc1.weight{e}`
        return "gated_column"
    return "column"


def _global_names(
    name: str, chunk: torch.nn.Module, ctx: ParallelContext, num_local: int
) -> tuple[str, ...]:
    """Global layer index, then one name per global expert id for expert params (canonical spelling)."""
    m = _LAYER.match(name)
    if m:
        layer = chunk.decoder.layers[int(m[1])]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[m.end() :]
    for rx in (_LOCAL_EXPERT, _GROUPED_EXPERT):
        e = rx.match(name)
        if e:
            local = int(e[2])
            ids = [r * num_local + local for r in range(ctx.ep)]
            if rx is _LOCAL_EXPERT:
                return tuple(canonical_megatron_name(f"{e[1]}{g}{e[3]}") for g in ids)
            return tuple(canonical_megatron_name(f"{e[1]}{g}") for g in ids)
    return (canonical_megatron_name(name),)


def _num_local_experts(hf_config: Any, ctx: ParallelContext) -> int:
    fam = find_family(hf_config)
    num = fam.num_experts(hf_config) if fam is not None else 0
    return num // ctx.ep if num else 0


def _local_params(
    chunks: Sequence[torch.nn.Module], ctx: ParallelContext, hf_config: Any, gated: bool
) -> list[tuple[ParamMeta, torch.Tensor]]:
    """This stage's parameters with their metadata (identical across the TP/EP ranks of the stage)."""
    tied = tied_embeddings(hf_config)
    num_local = _num_local_experts(hf_config, ctx)
    out = []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if tied and name == "output_layer.weight":
                continue  # a copy of the embedding on the last stage; the receiver re-adds lm_head
            expert = not getattr(param, "allreduce", True)
            kind = _tp_kind(name, param, gated)
            size = _group_size(ctx.etp_group if expert else ctx.tp_group)
            shape = list(param.shape)
            if kind in ("column", "gated_column"):
                shape[0] *= size
            elif kind == "row":
                shape[1] *= size
            names = _global_names(name, chunk, ctx, num_local)
            meta = ParamMeta(names, tuple(shape), param.dtype, kind, expert)
            out.append((meta, param))
    return out


def _gather(param: torch.Tensor, meta: ParamMeta, ctx: ParallelContext) -> list[torch.Tensor]:
    """TP (or expert-TP) gather, then EP gather: one full tensor per name in `meta.names`."""
    data = param.detach()
    group = ctx.etp_group if meta.expert else ctx.tp_group
    if meta.kind != "replicated" and _group_size(group) > 1:
        shards = [torch.empty_like(data) for _ in range(_group_size(group))]
        dist.all_gather(shards, data.contiguous(), group=group)
        data = merge_tp_shards(meta.kind, shards)
    if meta.expert and ctx.ep > 1:
        per_rank = [torch.empty_like(data) for _ in range(ctx.ep)]
        dist.all_gather(per_rank, data.contiguous(), group=ctx.ep_group)
        return per_rank
    return [data]


def _stage_metadata(
    local: list[tuple[ParamMeta, torch.Tensor]], ctx: ParallelContext
) -> list[list[ParamMeta]]:
    metas = [m for m, _ in local]
    if ctx.pp == 1:
        return [metas]
    per_stage: list[Any] = [None] * ctx.pp
    dist.all_gather_object(per_stage, metas, group=ctx.pp_group)
    return per_stage


def _full_tensors(
    stage: int,
    meta: ParamMeta,
    param: torch.Tensor | None,
    ctx: ParallelContext,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """The full tensors of one parameter on every rank: gather on the owning stage, broadcast over PP."""
    if ctx.pp_rank == stage:
        assert param is not None
        tensors = _gather(param, meta, ctx)
    else:
        tensors = [
            torch.empty(meta.full_shape, dtype=meta.dtype, device=ctx.device) for _ in meta.names
        ]
    if ctx.pp > 1:
        src = dist.get_global_rank(ctx.pp_group, stage)
        for t in tensors:
            dist.broadcast(t, src=src, group=ctx.pp_group)
    return [t.to(dtype) if dtype is not None else t for t in tensors]


def iter_hf_tensors(
    model_chunks: Sequence[torch.nn.Module],
    ctx: ParallelContext,
    hf_config: Any,
    *,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, full tensor)` pairs on every rank, in pipeline-stage then parameter order."""
    gated = bool(getattr(model_chunks[0].config, "gated_linear_unit", False))
    local = _local_params(model_chunks, ctx, hf_config, gated)
    stages = _stage_metadata(local, ctx)
    with torch.no_grad():
        for stage, metas in enumerate(stages):
            for idx, meta in enumerate(metas):
                param = local[idx][1] if stage == ctx.pp_rank else None
                tensors = _full_tensors(stage, meta, param, ctx, dtype)
                for name, full in zip(meta.names, tensors, strict=True):
                    yield from megatron_to_hf(name, full, hf_config)


def export_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    ctx: ParallelContext,
    hf_config: Any,
    *,
    bucket_mb: float = 512,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of `(hf_name, full tensor)` of at most `bucket_mb` MB (a larger single tensor is its own)."""
    if bucket_mb <= 0:
        raise ValueError(f"rollout.weight_sync_bucket_mb={bucket_mb}: must be > 0")
    limit = int(bucket_mb * 1e6)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in iter_hf_tensors(model_chunks, ctx, hf_config, dtype=dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.contiguous()))
        size += nbytes
    if bucket:
        yield bucket


def write_hf_dir(
    model_chunks: Sequence[torch.nn.Module],
    ctx: ParallelContext,
    hf_config: Any,
    out_dir: str | os.PathLike[str],
    *,
    hf_src: str | os.PathLike[str],
    dtype: torch.dtype,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write the live model as an HF directory at `out_dir` (replaced if it exists); every rank calls it.

    World rank 0 writes `out_dir.tmp/` (safetensors in `dtype`, config with that dtype, generation
    config and tokenizer files of `hf_src`) and renames it into place once complete, so an interrupted
    export never leaves a partial `out_dir`.
    """
    from megatron_spell.mcore.checkpoint import write_hf_side_files

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
    for name, tensor in iter_hf_tensors(model_chunks, ctx, hf_config, dtype=dtype):
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
        write_hf_side_files(hf_src, tmp, dtype)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        logger.info("wrote %s (%.1f MB)", out, writer.total_bytes / 1e6)
    dist.barrier()
