"""Rank functions for the converter's multi-process tests (module-level so `run_distributed` can pickle them).

`layouts_worker` loads one converted checkpoint at several TP/PP/EP/SP layouts in turn (re-initialising
Megatron's parallel state between them) and returns the full-vocab logits of a fixed prompt from the rank
that holds them (last pipeline stage, TP-gathered, tp_rank 0). `plain_worker` does the same with a
GPTModel built by tests/dist/convert/plain_gpt.py (no megatron_spell model/convert code).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def checkpoint_logits(hf_config: Any, ckpt_dir: str, ctx: Any, tokens: list[int]):
    """`forward_logits` of the model built by `build_model` at `ctx`'s layout and loaded from the
    Megatron checkpoint `ckpt_dir`."""
    from megatron_spell.mcore.checkpoint import load_checkpoint
    from megatron_spell.mcore.model import build_model

    chunks = build_model(hf_config, ctx)
    load_checkpoint(chunks, ckpt_dir)
    return forward_logits(
        chunks, tokens, hf_config.hidden_size, hf_config.vocab_size, ctx.tp_group, ctx.pp_group
    )


def forward_logits(chunks: Any, tokens: list[int], hidden: int, vocab: int, tp_group, pp_group):
    """Full-sequence logits [S, vocab] on the last PP stage (gathered over TP), else None.

    `chunks`: one model or this rank's list of virtual-pipeline chunks. Activations travel with plain
    send/recv in the interleaved order (chunk v of stage p feeds chunk v of stage p+1; the last stage's
    chunk v feeds chunk v+1 of stage 0).
    """
    chunks = chunks if isinstance(chunks, list) else [chunks]
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens))[None]
    pp_ranks = dist.get_process_group_ranks(pp_group)
    pp, stage = len(pp_ranks), pp_ranks.index(dist.get_rank())
    out = None
    with torch.no_grad():
        for v, model in enumerate(chunks):
            model.eval()
            if v > 0 or stage > 0:
                buf = torch.empty(len(tokens), 1, hidden)
                dist.recv(buf, src=pp_ranks[(stage - 1) % pp])
                model.set_input_tensor(buf)
            out = model(ids, pos, None)
            if v < len(chunks) - 1 or stage < pp - 1:
                dist.send(out.contiguous(), dst=pp_ranks[(stage + 1) % pp])
        if stage < pp - 1:
            return None
        tp = dist.get_world_size(tp_group)
        if tp > 1:
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=tp_group)
            out = torch.cat(parts, dim=-1)
        if dist.get_rank(tp_group) != 0:
            return None
        return out[0, :, :vocab].float().numpy()


def layouts_worker(
    rank: int,
    world: int,
    hf_dir: str,
    ckpt_dir: str,
    layouts: dict[str, dict],
    tokens: list[int],
    plain_tps: tuple[int, ...] = (),
) -> dict[str, np.ndarray]:
    """Logits per layout name; plus "plain_tp{n}" from the plain GPTModel for each n in plain_tps."""
    from megatron_spell.config import ParallelConfig
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel

    hf_config = load_hf_config(hf_dir)
    results: dict[str, np.ndarray] = {}
    try:
        for name, layout in layouts.items():
            ctx = init_parallel(ParallelConfig(**layout))
            logits = checkpoint_logits(hf_config, ckpt_dir, ctx, tokens)
            if logits is not None:
                results[name] = logits
            dist.barrier()
    finally:
        destroy_parallel()
    for tp in plain_tps:
        logits = plain_worker(rank, world, hf_dir, f"{ckpt_dir}/release", tp, tokens)
        if logits is not None:
            results[f"plain_tp{tp}"] = logits
        dist.barrier()
    return results


def plain_worker(
    rank: int, world: int, hf_dir: str, release_dir: str, tp: int, tokens: list[int]
) -> np.ndarray | None:
    from megatron_spell.mcore.cpu_support import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoConfig

    from tests.dist.convert.plain_gpt import load_plain, plain_gpt_model

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0)
    try:
        hf_config = AutoConfig.from_pretrained(hf_dir)
        model = plain_gpt_model(hf_config)
        load_plain(model, release_dir)
        return forward_logits(
            model,
            tokens,
            hf_config.hidden_size,
            hf_config.vocab_size,
            ps.get_tensor_model_parallel_group(),
            ps.get_pipeline_model_parallel_group(),
        )
    finally:
        ps.destroy_model_parallel()
