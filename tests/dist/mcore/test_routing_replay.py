"""MoE routing replay on gloo: the replayed forward is layout-invariant and uses the given routing.

A tiny Qwen3-MoE (2 layers, 4 experts, top-2) is converted once. The given routing of every token is
a random pair of experts (so it differs from the router's own choice almost everywhere), with some
rows at -1 (no routing: the router's own choice is expected there). Per layout, one spawn checks:

* the experts each router used equal the given ones at every token with routing, and the router's
  own choice (from a forward without replay at the same layout) at every -1 row;
* the replayed log-probs and the step's loss / grad norm equal the single-process replayed ones,
  and differ from the un-replayed log-probs (the replay changed the forward);
* the 4-rank spawn also routes the samples' routing through `exchange_routing` from the ranks that
  "generated" them (references all-gathered, as the loop does): each rank receives exactly its DP
  share's CP-local rows, and a step on them equals the step on whole routing.

Activation recomputation (the router re-runs in the backward pass, REPLAY_BACKWARD) is not checked:
Megatron's checkpointing saves the CUDA RNG state and fails on CPU (docs/platform.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist.mcore._engine_harness import build_policy, fixed_batch, layout, to_numpy
from tests.helpers.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
TOL = 1e-5
LAYERS, EXPERTS, TOPK = 2, 4, 2


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("r3")
    hf = make_tiny_hf_model(root / "moe", "qwen3_moe")
    ckpt = root / "moe_ckpt"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(hf)]
        + ["--out-dir", str(ckpt), "--quiet"],
        check=True,
        capture_output=True,
    )
    return str(hf), str(ckpt)


def given_routing(samples) -> list[np.ndarray]:
    """Random distinct expert pairs per token and layer (uint8), 255 on a few rows."""
    g = np.random.default_rng(7)
    out = []
    for i, s in enumerate(samples):
        n = s.num_tokens
        r = np.stack([g.permutation(EXPERTS)[:TOPK] for _ in range(n * LAYERS)]).reshape(
            n, LAYERS, TOPK
        )
        r = r.astype(np.uint8)
        r[-1] = 255  # the last token: vLLM never routes it
        if i == 0:
            r[1:3] = 255  # prompt rows served from a cache nobody computed
        out.append(r)
    return out


def _engine(hf_dir, ckpt, par):
    from megatron_spell.config import TrainConfig

    train = TrainConfig(
        lr=1e-3,
        adam_eps=1e-3,
        use_distributed_optimizer=False,
        logprob_chunk_size=8,
        max_tokens_per_microbatch=64,
        recompute="none",
    )
    overrides = {"moe_enable_routing_replay": True}
    engine, ctx, _, _ = build_policy(
        hf_dir, ckpt, par, train, temperature=0.7, config_overrides=overrides
    )
    return engine, ctx


def _used_rows(engine, samples):
    """{(sample, token): expert ids [layers, topk] sorted} the routers used in the last pass."""
    packed = engine.pack(samples)
    out = {}
    forwards = engine.replay.used
    assert len(forwards) == len(packed.micro_batches)
    for mb, (positions, used) in zip(packed.micro_batches, forwards):
        cu = mb.cu_seqlens_padded.tolist()
        for row, p in enumerate(positions.tolist()):
            k = next(j for j in range(len(cu) - 1) if cu[j] <= p < cu[j + 1])
            if k >= len(mb.sample_ids):
                continue  # the equal-length pad sequence
            sid, tok = mb.sample_ids[k], p - cu[k]
            if tok >= samples[sid].num_tokens:
                continue  # padding
            ids = np.stack([used[c][row].numpy() for c in sorted(used)])
            out[(sid, tok)] = np.sort(ids, axis=-1)
    engine.replay.used.clear()
    return out


def _check_layout(hf_dir, ckpt, par, exchange=False):
    import dataclasses

    import torch.distributed as dist

    from megatron_spell.mcore.parallel import destroy_parallel
    from megatron_spell.mcore.routing_exchange import cp_local_rows, exchange_routing
    from megatron_spell.types import RoutedExperts

    engine, ctx = _engine(hf_dir, ckpt, par)
    plain = fixed_batch(vocab=500)
    routing = given_routing(plain)
    replayed = [dataclasses.replace(s, routing=r) for s, r in zip(plain, routing)]
    engine.replay.trace = True
    free_lps = engine.compute_logprobs(plain)
    own = _used_rows(engine, plain)
    lps = engine.compute_logprobs(replayed)
    used = _used_rows(engine, replayed)
    engine.replay.trace = False
    checked = mismatched = fallback = fallback_bad = 0
    for (sid, tok), ids in used.items():
        given = routing[sid][tok]
        if (given == 255).any():
            fallback += 1
            # the first MoE layer's input does not depend on the routing of other tokens, so
            # there the router's own choice is the free pass's; deeper layers see replayed tokens
            fallback_bad += int(not np.array_equal(ids[0], own[(sid, tok)][0]))
        else:
            checked += 1
            mismatched += int(not np.array_equal(ids, np.sort(given.astype(np.int64), -1)))
    differs = sum(
        int(not np.array_equal(own[k], np.sort(routing[k[0]][k[1]].astype(np.int64), -1)))
        for k in used
        if not (routing[k[0]][k[1]] == 255).any()
    )
    counts = [checked, mismatched, fallback, fallback_bad, differs]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counts)  # every rank routed its own tokens: sum over ranks
    totals = [sum(p[i] for p in parts) for i in range(len(counts))]
    out = {
        "lps": [x.numpy() for x in lps],
        "free_lps": [x.numpy() for x in free_lps],
        **dict(zip(("checked", "mismatched", "fallback", "fallback_bad", "own_differs"), totals)),
    }
    if exchange:
        # the rollout side: sample i was generated (and its routing is held) on rank i % world
        world, me = dist.get_world_size(), dist.get_rank()
        mine = [
            RoutedExperts(me, data=r) if i % world == me else None for i, r in enumerate(routing)
        ]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)  # what the loop's all-gather of the rounds does
        refs = [gathered[i % world][i] for i in range(len(routing))]
        n = [s.num_tokens for s in plain]
        padded, assignment = engine.dp_plan(n)
        got = exchange_routing(refs, n, padded, assignment, ctx)
        assert set(got) == set(assignment[ctx.dp_rank]), (sorted(got), assignment)
        for sid, rows in got.items():
            from megatron_spell.mcore.packing import routing_rows

            want = cp_local_rows(
                routing_rows(routing[sid], n[sid]), padded[sid], ctx.cp, ctx.cp_rank
            )
            assert torch.equal(rows, want), sid
        local = [
            dataclasses.replace(s, routing=got.get(i), routing_local=got.get(i) is not None)
            for i, s in enumerate(plain)
        ]
        out["exchanged_metrics"] = engine.train_step(local)
        RoutedExperts.release_all()
        destroy_parallel()
        engine, ctx = _engine(hf_dir, ckpt, par)
    out["metrics"] = engine.train_step(replayed)
    destroy_parallel()
    return to_numpy(out)


def _worker(rank, world, hf_dir, ckpt, layouts):
    out = {}
    for name, (par, kw) in layouts.items():
        res = _check_layout(hf_dir, ckpt, layout(**par), **kw)
        if rank == 0:
            out[name] = res
    return out


REFERENCE = {"single": ({}, {})}
FOUR_RANK = {
    "tp2_sp_cp2_ep2": (
        dict(
            tensor_model_parallel_size=2,
            sequence_parallel=True,
            context_parallel_size=2,
            expert_model_parallel_size=2,
        ),
        {"exchange": True},
    ),
    "dp2_cp2_ep2": (dict(context_parallel_size=2, expert_model_parallel_size=2), {}),
}


@pytest.fixture(scope="module")
def reference(moe):
    return run_distributed(_worker, 1, *moe, REFERENCE, timeout=600)[0]


def _check_routing(res):
    samples = fixed_batch(vocab=500)
    fallback = len(samples) + 2  # every last token, and two prompt rows of the first sample
    assert res["checked"] + res["fallback"] == sum(s.num_tokens for s in samples), res
    assert res["mismatched"] == 0, res
    assert res["fallback"] == fallback and res["fallback_bad"] == 0, res
    assert res["own_differs"] > res["checked"] // 2, res  # the given routing is not the router's


def test_single_process_replay_uses_the_given_routing(reference):
    res = reference["single"]
    _check_routing(res)
    gap = max(float(abs(a - b).max()) for a, b in zip(res["lps"], res["free_lps"]))
    assert gap > 1e-2, gap


def test_replay_composes_with_tp_sp_cp_ep(moe, reference):
    results = run_distributed(_worker, 4, *moe, FOUR_RANK, timeout=900)[0]
    ref = reference["single"]
    for name, res in results.items():
        _check_routing(res)
        # every token with routing was routed (and checked) exactly once across the ranks
        assert (res["checked"], res["fallback"]) == (ref["checked"], ref["fallback"]), name
        diff = max(float(abs(a - b).max()) for a, b in zip(res["lps"], ref["lps"]))
        assert diff < TOL, (name, diff)
        for m in (res["metrics"], res.get("exchanged_metrics", res["metrics"])):
            assert abs(m["train/loss"] - ref["metrics"]["train/loss"]) < TOL, name
            assert abs(m["train/grad_norm"] - ref["metrics"]["train/grad_norm"]) < 1e-4, name
