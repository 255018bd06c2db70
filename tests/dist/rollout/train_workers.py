"""Rank function: a real GRPO optimizer step (training engine) -> export -> vLLM, then parity checks.

Uses the training engine's `PolicyEngine` (train_step, forward-only compute_logprobs) as "Megatron's
recomputed logprobs", at any Megatron layout, PP included. Every rank hosts a vLLM engine (rollout TP=1,
vLLM data parallel = world); samples are all-gathered so every rank trains/recomputes the same batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tests.dist.mcore._engine_harness import build_policy
from tests.dist.rollout.sync_workers import MAX_TOKENS, TEMPERATURE


def _policy(hf_dir: str, ckpt_dir: str, parallel: dict):
    from megatron_spell.config import ParallelConfig, TrainConfig

    train = TrainConfig(
        lr=3e-3,
        adam_eps=1e-3,
        use_distributed_optimizer=False,
        logprob_chunk_size=8,
        max_tokens_per_microbatch=512,
    )
    engine, ctx, hf, models = build_policy(
        hf_dir, ckpt_dir, ParallelConfig(**parallel), train, temperature=TEMPERATURE
    )
    return ctx, hf, models, engine


def _samples(engine, prompts, rank: int):
    from megatron_spell.mcore.packing import TrainSample

    out = engine.generate(prompts, 2, max_tokens=MAX_TOKENS, top_p=1.0, top_k=-1)
    mine = [(p, list(c.token_ids), list(c.logprobs)) for p, cs in zip(prompts, out) for c in cs]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    flat = [s for per_rank in everyone for s in per_rank]
    samples = [
        TrainSample(prompt_ids=p, response_ids=r, advantage=1.0 if i % 2 else -1.0, old_logprobs=lp)
        for i, (p, r, lp) in enumerate(flat)
    ]
    return samples, [lp for _, _, lp in flat]


def train_step_sync(
    rank: int, world: int, hf_dir: str, ckpt_dir: str, out_dir: str, parallel: dict
) -> list[dict]:
    from megatron_spell.chat import render_user_turn
    from megatron_spell.config import RolloutConfig
    from megatron_spell.mcore.export import export_hf_weights
    from megatron_spell.mcore.parallel import destroy_parallel
    from megatron_spell.rollout.engine import RolloutEngine
    from tests.e2e.rollout import hf_ref
    from tests.helpers.logprobs import logprob_mismatch

    ctx, hf_config, models, policy = _policy(hf_dir, ckpt_dir, parallel)
    settings = RolloutConfig(
        temperature=TEMPERATURE, top_p=1.0, max_prompt_length=128, max_response_length=16,
        kv_cache_gib=0.25, seed=0, max_num_batched_tokens=None,
    )  # fmt: skip
    engine = RolloutEngine(hf_dir, settings, dtype="float32")
    q = ("Who jumps?", "What is lazy?") if rank == 0 else ("Where is it?", "Why?")
    prompts = [render_user_turn(engine.tokenizer, "The quick brown fox. " + x) for x in q]
    results = []
    for step in (1, 2):
        samples, _ = _samples(engine, prompts, rank)
        before = policy.compute_logprobs(samples)
        metrics = policy.train_step(samples)  # one real optimizer step
        moved = max(
            float((a - b).abs().max())
            for a, b in zip(before, policy.compute_logprobs(samples), strict=True)
        )
        received: dict[str, torch.Tensor] = {}

        def stream(received=received):
            for bucket in export_hf_weights(models, ctx, hf_config, bucket_mb=0.2):
                received.update((n, t.clone()) for n, t in bucket)
                yield bucket

        engine.load_weights(stream())
        new_dir = hf_ref.write_hf_dir(hf_dir, Path(out_dir) / f"r{rank}_s{step}", received)
        hf = hf_ref.load_hf(new_dir)
        greedy = engine.generate(prompts, 1, max_tokens=MAX_TOKENS, temperature=0.0)
        for prompt, [c] in zip(prompts, greedy, strict=True):
            assert list(c.token_ids) == hf_ref.hf_greedy(hf, prompt, len(c.token_ids))
        after, vllm_lps = _samples(engine, prompts, rank)
        recomputed = [t.tolist() for t in policy.compute_logprobs(after)]
        diff = logprob_mismatch(vllm_lps, recomputed)
        assert diff.max_abs < 1e-4, diff
        results.append(
            {"max_abs": diff.max_abs, "skipped": metrics["train/skipped"], "moved": moved}
        )
    destroy_parallel()
    return results
