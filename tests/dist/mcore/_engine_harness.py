"""Shared pieces of the training-engine dist tests: fixed batches, engine construction, full-tensor gathers.

`full_tensors(models, ctx, attr)` rebuilds every parameter's full (TP=PP=EP=1) tensor of `attr` ("main_grad"
or "data") under its canonical name (global layer and expert indices), so runs at different layouts can be
compared key by key with a single-process reference.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

from megatron_spell.config import ParallelConfig


def layout(**kw: Any) -> ParallelConfig:
    return ParallelConfig(**kw)


def fixed_batch(seed: int = 0, *, with_old: bool = True, vocab: int = 500) -> list:
    """Six trajectories (<= 200 tokens in all) with mixed-sign advantages, lengths not multiples of 4."""
    from megatron_spell.mcore.packing import TrainSample

    g = torch.Generator().manual_seed(seed)
    shapes = [
        (9, 5, 1.0),
        (21, 11, -1.0),
        (7, 26, 0.5),
        (30, 3, -0.5),
        (5, 17, 2.0),
        (13, 13, -1.5),
    ]
    out = []
    for p, r, a in shapes:
        old = (-torch.rand(r, generator=g) * 4 - 2).tolist() if with_old else None
        out.append(
            TrainSample(
                prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
                response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
                advantage=a,
                old_logprobs=old,
            )
        )
    return out


def shared_batch(seed: int = 1, *, vocab: int = 500) -> list:
    """Two groups sharing a prompt (4 responses of lengths 5, 11, 1, 8; 2 of lengths 13, 6) and one
    single trajectory, mixed-sign advantages, random old log-probs (the first group is not contiguous)."""
    from megatron_spell.mcore.packing import TrainSample

    g = torch.Generator().manual_seed(seed)
    prompts = {
        k: torch.randint(3, vocab, (n,), generator=g).tolist() for k, n in (("a", 19), ("b", 7))
    }
    prompts["c"] = torch.randint(3, vocab, (10,), generator=g).tolist()
    shapes = [("a", 5, 1.0), ("b", 13, 2.0), ("a", 11, -1.0), ("a", 1, 0.5), ("c", 9, 1.0)]
    shapes += [("a", 8, -0.5), ("b", 6, -1.5)]
    return [
        TrainSample(
            prompt_ids=prompts[k],
            response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
            advantage=a,
            old_logprobs=(-torch.rand(r, generator=g) * 4 - 2).tolist(),
        )
        for k, r, a in shapes
    ]


def responder_batch(samples: list, routing: list | None = None) -> Any:
    """`samples` as a `TrainBatch` of responder trajectories for `MegatronPolicy.update`: their
    completions carry the samples' old_logprobs as vLLM's, and `routing[i]` (a [tokens, layers,
    top-k] array) as sample i's routed experts when given."""
    from megatron_spell.types import Completion, Role, RoutedExperts, Task, TrainBatch, Trajectory

    def experts(i: int):
        return None if routing is None else RoutedExperts(0, data=routing[i])

    trajs = tuple(
        Trajectory(
            role=Role.RESPONDER,
            task=Task.DOC_GENERAL_QA,
            uid=str(i),
            prompt_ids=tuple(s.prompt_ids),
            completion=Completion(
                s.response_ids, "", s.old_logprobs, "stop", routed_experts=experts(i)
            ),
            advantage=float(s.advantage),
        )
        for i, s in enumerate(samples)
    )
    return TrainBatch(responder=trajs, questioner=(), verifier=())


def build_policy(
    hf_dir: str,
    ckpt: str,
    par: ParallelConfig,
    train: Any,
    *,
    temperature: float,
    config_overrides: dict[str, Any] | None = None,
):
    """A `PolicyEngine` over the checkpoint `ckpt` of `hf_dir` at layout `par`, with its optimizer
    (TrainConfig `train`); returns the engine, the parallel context, the HF config and the model
    chunks before DDP wrapping. `config_overrides` go to the TransformerConfig (build_model)."""
    from megatron_spell.mcore.attention import PackedCPAttention
    from megatron_spell.mcore.checkpoint import load_checkpoint
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.optimizer import build_optimizer, wrap_ddp
    from megatron_spell.mcore.parallel import init_parallel
    from megatron_spell.mcore.train_step import PolicyEngine

    hf = load_hf_config(hf_dir)
    ctx = init_parallel(par)
    models = build_model(
        hf, ctx, core_attention=PackedCPAttention, config_overrides=config_overrides
    )
    load_checkpoint(models, ckpt)
    ddp = wrap_ddp(models, ctx, use_distributed_optimizer=train.use_distributed_optimizer)
    opt = build_optimizer(ddp, train, ctx)
    engine = PolicyEngine(
        ddp,
        ctx,
        train,
        temperature=temperature,
        vocab_size=hf.vocab_size,
        pad_token_id=0,
        optimizer=opt,
    )
    return engine, ctx, hf, models


def make_engine(
    hf_dir: str,
    ckpt: str,
    par: ParallelConfig,
    *,
    budget: int = 64,
    lr: float = 1e-3,
    adam_eps: float = 1e-3,
    grad_clip: float = 1.0,
    dist_opt: bool = False,
    temperature: float = 0.7,
    shared_prefix: bool = False,
    **train_kw: Any,
):
    """`train_kw`: further TrainConfig fields (e.g. the rollout correction's)."""
    from megatron_spell.config import TrainConfig

    train = TrainConfig(
        lr=lr,
        adam_eps=adam_eps,
        grad_clip=grad_clip,
        use_distributed_optimizer=dist_opt,
        logprob_chunk_size=8,
        max_tokens_per_microbatch=budget,
        shared_prefix=shared_prefix,
        **train_kw,
    )
    engine, ctx, _, _ = build_policy(hf_dir, ckpt, par, train, temperature=temperature)
    return engine, ctx


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def _canonical(name: str, chunk: Any, ctx: Any) -> str:
    name = name.removeprefix("module.")
    m = _LAYER.search(name)
    if m:
        layer = chunk.decoder.layers[int(m.group(1))]
        name = name.replace(m.group(0), f"decoder.layers.{layer.layer_number - 1}.")
        e = _EXPERT.search(name)
        if e:
            n_local = len(layer.mlp.experts.local_experts)
            glob = ctx.ep_rank * n_local + int(e.group(1))
            name = name.replace(e.group(0), f"local_experts.{glob}.")
    return name


def _merge_tp(name: str, p: torch.Tensor, value: torch.Tensor, group: Any) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1 or not getattr(p, "tensor_model_parallel", False):
        return value
    shards = [torch.empty_like(value) for _ in range(world)]
    dist.all_gather(shards, value.contiguous(), group=group)
    if p.partition_dim == 1:
        return torch.cat(shards, dim=1)
    if "linear_fc1" in name:  # gated MLP: each rank holds [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def full_tensors(models: list, ctx: Any, attr: str) -> dict[str, torch.Tensor]:
    """Every parameter's full tensor of `attr`, on every rank (collective over the whole world)."""
    mine: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    for ddp in models:
        chunk = ddp.module
        for name, p in chunk.named_parameters():
            value = getattr(p, attr).detach().float().clone()
            is_expert = not getattr(p, "allreduce", True)
            group = ctx.etp_group if is_expert else ctx.tp_group
            full = _merge_tp(name, p, value, group)
            canon = _canonical(name, chunk, ctx)
            (experts if is_expert else mine)[canon] = full
    if ctx.ep > 1:
        parts: list = [None] * ctx.ep
        dist.all_gather_object(parts, experts, group=ctx.ep_group)
        for part in parts:
            mine.update(part)
    else:
        mine.update(experts)
    if ctx.pp > 1:
        parts = [None] * ctx.pp
        dist.all_gather_object(parts, mine, group=ctx.pp_group)
        mine = {}
        for part in parts:
            mine.update(part)
    return mine


def to_numpy(obj: Any) -> Any:
    """Tensors -> numpy, recursively: torch tensors sent back from a spawned rank travel as shared-memory
    file descriptors that die with the process, numpy arrays are pickled by value."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


def max_abs_diffs(a: dict, b: dict) -> dict[str, float]:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:6]
    return {k: float(abs(a[k] - b[k]).max()) for k in a}
