"""Rank functions for the Megatron -> vLLM weight-sync tests (module level: spawned by run_distributed).

Decision (documented in megatron_spell/rollout/engine.py): every rank hosts a vLLM engine. With 2 ranks the
engines run under `external_launcher` (rollout TP=1, vLLM data-parallel 2), each generating its own prompts,
and each receives the full exported tensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist

TEMPERATURE = 0.7
MAX_TOKENS = 8


@torch.no_grad()
def _load_from_hf(chunks, ctx, hf_config, hf_dir: str) -> None:
    """Fill a single-rank model (TP=PP=EP=1) straight from the HF tensors via the converter's stream:
    for a model without a converted checkpoint (SmolLM2). At that layout every parameter name is the
    full Megatron name, so no sharding or renaming is involved."""
    from megatron_spell.convert import hf_to_megatron_state_dict
    from megatron_spell.convert.hf_io import iter_hf_tensors
    from megatron_spell.mcore.model import padded_vocab_size

    assert ctx.tp == ctx.pp == ctx.ep == 1, "via_hf is for single-rank models; load a checkpoint"
    padded = padded_vocab_size(hf_config, ctx.tp)
    full = dict(
        hf_to_megatron_state_dict(iter_hf_tensors(hf_dir), hf_config, padded_vocab_size=padded)
    )
    [chunk] = chunks
    for name, p in chunk.named_parameters():
        key = name
        if key == "output_layer.weight" and key not in full:  # tied: the embedding
            key = "embedding.word_embeddings.weight"
        p.copy_(full[key])


def _build(hf_dir: str, ckpt_dir: str, via_hf: bool = False, **parallel: int):
    from megatron_spell.config import ParallelConfig
    from megatron_spell.mcore.checkpoint import load_checkpoint
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.parallel import init_parallel

    ctx = init_parallel(ParallelConfig(**parallel))
    hf_config = load_hf_config(hf_dir)
    chunks = build_model(hf_config, ctx)
    if via_hf:
        _load_from_hf(chunks, ctx, hf_config, hf_dir)
    else:
        load_checkpoint(chunks, ckpt_dir)
    for c in chunks:
        c.eval()
    return ctx, hf_config, chunks


def _perturb(chunks, ctx, step: int, scale: float) -> None:
    """A deliberate weight change, different on every shard, identical on replicas (like an optimizer step)."""
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                # replicas (norms, router; non-expert params across EP) must stay identical
                tp_rank = ctx.tp_rank if getattr(p, "tensor_model_parallel", False) else -1
                ep_rank = ctx.ep_rank if not getattr(p, "allreduce", True) else -1
                key = f"{name}|{tp_rank}|{ctx.pp_rank}|{ep_rank}|{step}".encode()
                seed = int(hashlib.sha256(key).hexdigest()[:8], 16)
                gen = torch.Generator().manual_seed(seed)
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _collect(buckets) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for bucket in buckets:
        for name, t in bucket:
            assert name not in out, f"{name} exported twice"
            out[name] = t.clone()
    return out


def export_matches_hf(rank: int, world: int, hf_dir: str, ckpt_dir: str, parallel: dict) -> int:
    """Export without any weight change and compare with the HF tensors the checkpoint came from
    (bit-exact). Returns the number of tensors compared (tensors are not sent back: fd passing)."""
    from megatron_spell.mcore.export import export_hf_weights
    from megatron_spell.mcore.parallel import destroy_parallel
    from tests.e2e.rollout import hf_ref

    ctx, hf_config, chunks = _build(hf_dir, ckpt_dir, **parallel)
    buckets = list(export_hf_weights(chunks, ctx, hf_config, bucket_mb=0.05))
    assert len(buckets) > 1
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    assert all(s <= 50_000 or len(b) == 1 for s, b in zip(sizes, buckets, strict=True))
    got = _collect(buckets)
    destroy_parallel()
    ref = hf_ref.read_hf_tensors(hf_dir)
    if getattr(hf_config, "tie_word_embeddings", False):
        ref.pop("lm_head.weight", None)  # the receiver adds it from the embedding
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)
    return len(ref)


@torch.no_grad()
def _megatron_logprobs(chunks, ctx, vocab: int, prompt: list[int], comp: list[int]) -> torch.Tensor:
    """Megatron's recomputed log_softmax(logits / T) of the completion tokens (PP=1)."""
    ids = torch.tensor([prompt + comp])
    pos = torch.arange(ids.shape[1])[None]
    logits = chunks[0](ids, pos, attention_mask=None)  # [1, s, V / tp]
    if ctx.tp > 1:
        parts = [torch.empty_like(logits) for _ in range(ctx.tp)]
        dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
        logits = torch.cat(parts, dim=-1)
    logits = logits[0, len(prompt) - 1 : -1, :vocab].double()
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    return logp.gather(1, torch.tensor(comp)[:, None])[:, 0]


def _check_step(engine, chunks, ctx, hf_config, hf_dir: str, new_dir: Path, prompts) -> dict:
    from tests.e2e.rollout import hf_ref
    from tests.helpers.logprobs import logprob_mismatch

    hf = hf_ref.load_hf(new_dir)
    greedy = engine.generate(prompts, 1, max_tokens=MAX_TOKENS, temperature=0.0)
    for prompt, [c] in zip(prompts, greedy, strict=True):
        assert list(c.token_ids) == hf_ref.hf_greedy(hf, prompt, len(c.token_ids))
    sampled = engine.generate(prompts, 2, max_tokens=MAX_TOKENS, top_p=1.0, top_k=-1)
    mine = [(p, list(c.token_ids), list(c.logprobs)) for p, cs in zip(prompts, sampled) for c in cs]
    # Megatron's TP ranks must run the same inputs: every rank recomputes every rank's samples.
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    vllm_lps, mg_lps = [], []
    vocab = int(hf_config.vocab_size)
    for prompt, comp, lps in (s for rank_samples in everyone for s in rank_samples):
        vllm_lps.append(lps)
        mg_lps.append(_megatron_logprobs(chunks, ctx, vocab, prompt, comp).tolist())
    diff = logprob_mismatch(vllm_lps, mg_lps)
    assert diff.max_abs < 1e-4, diff
    return {"max_abs": diff.max_abs, "mean_abs": diff.mean_abs}


def sync_and_generate(
    rank: int,
    world: int,
    hf_dir: str,
    ckpt_dir: str,
    out_dir: str,
    parallel: dict,
    scale: float = 0.05,
    rollout_tp: int = 1,
) -> list[dict]:
    """Megatron (perturbed twice) -> export -> vLLM; greedy == HF, vLLM logprobs == Megatron's."""
    from megatron_spell.chat import render_user_turn
    from megatron_spell.config import RolloutConfig
    from megatron_spell.mcore.export import export_hf_weights
    from megatron_spell.mcore.parallel import destroy_parallel
    from megatron_spell.rollout.engine import RolloutEngine
    from tests.e2e.rollout import hf_ref

    ctx, hf_config, chunks = _build(hf_dir, ckpt_dir, **parallel)
    settings = RolloutConfig(
        temperature=TEMPERATURE, top_p=1.0, max_prompt_length=128, max_response_length=16,
        kv_cache_gib=0.25, seed=0, tensor_parallel_size=rollout_tp, max_num_batched_tokens=None,
    )  # fmt: skip
    engine = RolloutEngine(hf_dir, settings, dtype="float32")
    doc = "The quick brown fox jumps over the lazy dog. " * 2
    # vLLM data-parallel replicas get their own prompts; a vLLM TP group must get the same ones
    dp_rank = rank // rollout_tp
    questions = ("Who jumps?", "What is lazy?") if dp_rank == 0 else ("Where is it?", "Why?")
    prompts = [render_user_turn(engine.tokenizer, doc + q) for q in questions]
    results = []
    for step in (1, 2):
        _perturb(chunks, ctx, step, scale)
        received: dict[str, torch.Tensor] = {}

        def stream(received=received):
            for bucket in export_hf_weights(chunks, ctx, hf_config, bucket_mb=0.2):
                for name, t in bucket:
                    received[name] = t
                yield bucket

        stats = engine.load_weights(stream())
        assert stats.num_bytes > 0
        new_dir = Path(out_dir) / f"rank{rank}_step{step}"
        hf_ref.write_hf_dir(hf_dir, new_dir, received)
        results.append(_check_step(engine, chunks, ctx, hf_config, hf_dir, new_dir, prompts))
    destroy_parallel()
    return results
