"""MoE routing replay on gloo: the replayed forward is layout-invariant, uses the given routing and
composes with shared-prefix packing.

A tiny Qwen3-MoE (2 layers, 4 experts, top-2) is converted once. The given routing of every token is
a random pair of experts (so it differs from the router's own choice almost everywhere), with some
rows at 255 (no routing: the router's own choice is expected there); the samples of one prompt share
their prompt[:-1] rows (as vLLM's prefix cache gives them). Per layout, one spawn checks:

* ordinary sequences (`fixed_batch`): the experts each router used equal the given ones at every
  token with routing, and the router's own choice (from a forward without replay at the same
  layout) at the first MoE layer of every 255 row; the replay changed the log-probs;
* shared-prefix units (`shared_batch`, two groups and a single trajectory): the experts used equal
  the given ones at every token through the model (the prompt once, every response token); the
  replayed log-probs and the step's loss / grad norm equal those of the same batch packed unshared;
* every layout's replayed log-probs, loss and grad norm equal the single-process ones, also at PP=2
  (each stage replays its own layers; the counts are per (token, MoE layer) routing, so the stages'
  sum is the single process's);
* the TP2 x SP x CP2 x EP2 and PP2 x TP2 x SP x EP2 spawns also move the shared batch's routing
  through `exchange_routing` from the ranks that "generated" it (references all-gathered, as the loop does): each rank gets
  exactly its DP share's units, equal to the rows laid out from whole samples, and a step on them
  equals the step on whole routing.

The single-process run is repeated with full activation recompute, where the routers re-run in the
backward pass from Megatron's REPLAY_BACKWARD queue: the same steps. Every step starts from the
loaded weights (restored after each step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.dist.mcore._engine_harness import (
    build_policy,
    fixed_batch,
    layout,
    responder_batch,
    shared_batch,
    to_numpy,
)
from tests.helpers.convert import convert_to_megatron
from tests.helpers.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]
TOL = 1e-5
LAYERS, EXPERTS, TOPK = 2, 4, 2


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("r3")
    hf = make_tiny_hf_model(root / "moe", "qwen3_moe")
    ckpt = root / "moe_ckpt"
    convert_to_megatron([(hf, ckpt)])
    return str(hf), str(ckpt)


def given_routing(samples) -> list[np.ndarray]:
    """Random distinct expert pairs per token and layer (uint8), equal prompt[:-1] rows for equal
    prompts; 255 on every last token and on prompt rows 1:3 of sample 0's prompt."""
    g = np.random.default_rng(7)

    def pairs(n):
        rows = [g.permutation(EXPERTS)[:TOPK] for _ in range(n * LAYERS)]
        return np.stack(rows).reshape(n, LAYERS, TOPK).astype(np.uint8)

    heads: dict[tuple, np.ndarray] = {}
    out = []
    for s in samples:
        p = len(s.prompt_ids)
        if s.prompt_ids not in heads:
            heads[s.prompt_ids] = pairs(p - 1)
            if len(heads) == 1:
                heads[s.prompt_ids][1:3] = 255  # prompt rows served from a cache nobody computed
        r = np.concatenate([heads[s.prompt_ids], pairs(s.num_tokens - p + 1)])
        r[-1] = 255  # the last token: vLLM never routes it
        out.append(r)
    return out


def _engine(hf_dir, ckpt, par, recompute="none"):
    from megatron_spell.config import TrainConfig
    from megatron_spell.mcore.train_step import recompute_overrides

    train = TrainConfig(
        lr=1e-3,
        adam_eps=1e-3,
        use_distributed_optimizer=False,
        logprob_chunk_size=8,
        max_tokens_per_microbatch=64,
        recompute=recompute,
    )
    overrides = {"moe_enable_routing_replay": True, **recompute_overrides(recompute)}
    engine, ctx, _, _ = build_policy(
        hf_dir, ckpt, par, train, temperature=0.7, config_overrides=overrides
    )
    return engine, ctx


def _used_rows(engine, samples):
    """{(sample, token): {MoE layer: expert ids [topk] sorted}} the routers of this rank used in the
    last pass (a pipeline stage holds only its own layers)."""
    from megatron_spell.mcore.replay import pack_tokens

    packed = engine.pack(samples)
    units = engine.plan(samples).units
    out = {}
    forwards = engine.replay.used
    assert len(forwards) == len(packed.micro_batches)
    for mb, (positions, used) in zip(packed.micro_batches, forwards):
        tokens = pack_tokens(mb, samples, units)
        for row, p in enumerate(positions.tolist()):
            if p in tokens:  # not padding, not a pad sequence
                out[tokens[p]] = {c: np.sort(used[c][row].numpy()) for c in used}
    engine.replay.used.clear()
    return out


def _compare(used, routing, own=None) -> list[int]:
    """[checked, mismatched, fallback, fallback_bad, own_differs] of one traced pass, counted per
    (token, MoE layer) routing."""
    checked = mismatched = fallback = fallback_bad = differs = 0
    for (sid, tok), layers in used.items():
        given = routing[sid][tok]
        for col, ids in layers.items():
            if (given == 255).any():
                fallback += 1
                # the first MoE layer's input does not depend on the routing of other tokens, so
                # there the router's own choice is the free pass's; deeper layers see replayed
                # tokens
                if own is not None and col == 0:
                    fallback_bad += int(not np.array_equal(ids, own[(sid, tok)][0]))
            else:
                want = np.sort(given[col].astype(np.int64))
                checked += 1
                mismatched += int(not np.array_equal(ids, want))
                if own is not None:
                    differs += int(not np.array_equal(own[(sid, tok)][col], want))
    return [checked, mismatched, fallback, fallback_bad, differs]


def _summed(counts) -> dict[str, int]:
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counts)  # every rank routed its own tokens: sum over ranks
    names = ("checked", "mismatched", "fallback", "fallback_bad", "own_differs")
    return {k: sum(p[i] for p in parts) for i, k in enumerate(names)}


def _fresh_step(engine, saved, samples, **kw):
    """One step from the saved weights; the weights are restored after it."""
    metrics = engine.train_step(samples, **kw)
    with torch.no_grad():
        for model, params in zip(engine.models, saved):
            for p, s in zip(model.parameters(), params):
                p.data.copy_(s)
    return metrics


def _exchanged(engine, ctx, plain, routing, saved):
    """The shared batch's routing held by rank i % world, moved by `exchange_routing`."""
    import torch.distributed as dist

    from megatron_spell.mcore.routing_exchange import exchange_routing, local_routing
    from megatron_spell.types import RoutedExperts

    world, me = dist.get_world_size(), dist.get_rank()
    mine = [RoutedExperts(me, data=r) if i % world == me else None for i, r in enumerate(routing)]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)  # what the loop's all-gather of the rounds does
    refs = [gathered[i % world][i] for i in range(len(routing))]
    plan = engine.plan(plain)
    got = exchange_routing(refs, plain, plan, ctx)
    whole = [dataclasses.replace(s, routing=r) for s, r in zip(plain, routing)]
    want = local_routing(whole, plan, ctx.cp, ctx.cp_rank, ctx.dp_rank)
    assert sorted(got.rows) == sorted(plan.assignment[ctx.dp_rank]), (sorted(got.rows), plan)
    for u, rows in got.rows.items():
        assert torch.equal(rows, want.rows[u]), u
    assert got.num_prompt_differ == want.num_prompt_differ == 0
    metrics = _fresh_step(engine, saved, plain, routing=got)
    RoutedExperts.release_all()
    return metrics


def _policy_update(hf_dir, ckpt, plain_shared, routing_shared):
    """`MegatronPolicy.update` (train.routing_replay) on trajectories whose completions hold their
    routing as `RoutedExperts` of this rank, as the rollout engine leaves them."""
    from megatron_spell.config import load_config
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel
    from megatron_spell.mcore.policy import MegatronPolicy
    from megatron_spell.types import RoutedExperts

    overrides = [f"model.hf_dir={hf_dir}", f"model.load={ckpt}", "model.dtype=fp32"]
    overrides += ["train.lr=1e-3", "train.adam_eps=1e-3", "train.recompute=none"]
    overrides += ["train.max_tokens_per_microbatch=64", "train.logprob_chunk_size=8"]
    overrides += ["train.routing_replay=true", "rollout.temperature=0.7"]
    config = load_config(None, overrides)
    ctx = init_parallel(config.parallel)
    policy = MegatronPolicy(config, ctx, load_hf_config(hf_dir))
    metrics = policy.update(responder_batch(plain_shared, routing_shared))
    metrics["held_after"] = len(RoutedExperts._held)  # the update released the step's routing
    destroy_parallel()
    return metrics


def _check_layout(
    hf_dir, ckpt, par, exchange=False, unshared=False, recompute="none", policy=False
):
    from megatron_spell.mcore.parallel import destroy_parallel

    engine, ctx = _engine(hf_dir, ckpt, par, recompute)
    saved = [[p.detach().clone() for p in m.parameters()] for m in engine.models]
    plain = fixed_batch(vocab=500)
    routing = given_routing(plain)
    replayed = [dataclasses.replace(s, routing=r) for s, r in zip(plain, routing)]
    plain_shared = shared_batch()
    routing_shared = given_routing(plain_shared)
    shared = [dataclasses.replace(s, routing=r) for s, r in zip(plain_shared, routing_shared)]
    engine.replay.trace = True
    free_lps = engine.compute_logprobs(plain)
    own = _used_rows(engine, plain)
    lps = engine.compute_logprobs(replayed)
    counts = _summed(_compare(_used_rows(engine, replayed), routing, own))
    shared_lps = engine.compute_logprobs(shared)
    shared_counts = _summed(_compare(_used_rows(engine, shared), routing_shared))
    engine.replay.trace = False
    out = {
        "lps": [x.numpy() for x in lps],
        "free_lps": [x.numpy() for x in free_lps],
        "counts": counts,
        "shared_lps": [x.numpy() for x in shared_lps],
        "shared_counts": shared_counts,
        "units": [len(u) for u in engine.plan(shared).units],
        "metrics": _fresh_step(engine, saved, replayed),
        "shared_metrics": _fresh_step(engine, saved, shared),
    }
    if exchange:
        out["exchanged_metrics"] = _exchanged(engine, ctx, plain_shared, routing_shared, saved)
    if policy:  # the policy's on-policy update replays the routing its completions hold
        out["onpolicy_metrics"] = _fresh_step(engine, saved, shared, on_policy=True)
        out["onpolicy_free_metrics"] = _fresh_step(engine, saved, plain_shared, on_policy=True)
    if unshared:  # the same shared batch packed as separate sequences
        from megatron_spell.mcore.attention import set_rope_positions

        engine.shared_prefix = False
        for model in engine.models:
            set_rope_positions(model, None)  # Megatron's own positions again
        out["unshared_lps"] = [x.numpy() for x in engine.compute_logprobs(shared)]
        out["unshared_metrics"] = _fresh_step(engine, saved, shared)
    destroy_parallel()
    if policy:
        out["policy_metrics"] = _policy_update(hf_dir, ckpt, plain_shared, routing_shared)
    return to_numpy(out)


def _worker(rank, world, hf_dir, ckpt, layouts):
    out = {}
    for name, (par, kw) in layouts.items():
        res = _check_layout(hf_dir, ckpt, layout(**par), **kw)
        if rank == 0:
            out[name] = res
    return out


# with full activation recompute the routers re-run in the backward pass (REPLAY_BACKWARD)
REFERENCE = {
    "single": ({}, {"unshared": True, "policy": True}),
    "recompute": ({}, {"recompute": "full"}),
}
# Experts whole on their rank (ETP=1, as the Qwen3-30B-A3B preset): with ETP=TP=2 the alltoall
# dispatcher all-gathers uneven token counts over the expert-TP group, which gloo rejects
# (docs/platform.md), with or without replay.
FOUR_RANK = {
    "tp2_sp_cp2_ep2": (
        dict(
            tensor_model_parallel_size=2,
            sequence_parallel=True,
            context_parallel_size=2,
            expert_model_parallel_size=2,
            expert_tensor_parallel_size=1,
        ),
        {"exchange": True},
    ),
    "dp2_cp2_ep2": (dict(context_parallel_size=2, expert_model_parallel_size=2), {}),
    # one MoE layer per stage: each stage replays its own layers' columns of the rows it receives
    "pp2_tp2_sp_ep2": (
        dict(
            pipeline_model_parallel_size=2,
            tensor_model_parallel_size=2,
            sequence_parallel=True,
            expert_model_parallel_size=2,
            expert_tensor_parallel_size=1,
        ),
        {"exchange": True},
    ),
}


@pytest.fixture(scope="module")
def reference(moe):
    return run_distributed(_worker, 1, *moe, REFERENCE, timeout=600)[0]


def _unit_tokens(samples, units) -> int:
    """Tokens through the model: a shared unit's prompt once, all of an ordinary sequence."""
    total = 0
    for u in units:
        if len(u) == 1:
            total += samples[u[0]].num_tokens
        else:
            total += len(samples[u[0]].prompt_ids) - 1
            total += sum(len(samples[i].response_ids) for i in u)
    return total


def _check_routing(res):
    samples = fixed_batch(vocab=500)
    c = res["counts"]
    fallback = LAYERS * (len(samples) + 2)  # every last token, two prompt rows of the first sample
    assert c["checked"] + c["fallback"] == LAYERS * sum(s.num_tokens for s in samples), c
    assert c["mismatched"] == 0, c
    assert c["fallback"] == fallback and c["fallback_bad"] == 0, c
    assert c["own_differs"] > c["checked"] // 2, c  # the given routing is not the router's
    # shared batch: groups a (4 responses) and b (2) as units, c alone; every token through the
    # model was routed as given, except the two uncomputed prompt rows (once, in group a's unit)
    # and the last token of the ordinary sequence
    shared = shared_batch()
    assert sorted(res["units"]) == [1, 2, 4], res["units"]
    units = [[0, 2, 3, 5], [1, 6], [4]]
    c = res["shared_counts"]
    assert c["checked"] + c["fallback"] == LAYERS * _unit_tokens(shared, units), c
    assert c["mismatched"] == 0 and c["fallback"] == 3 * LAYERS, c


def _max_diff(a, b) -> float:
    return max(float(abs(x - y).max()) for x, y in zip(a, b) if x.size)


def _same_step(m, ref, what):
    assert abs(m["train/loss"] - ref["train/loss"]) < TOL, (what, m["train/loss"], ref)
    assert abs(m["train/grad_norm"] - ref["train/grad_norm"]) < 1e-4, (what, m, ref)


def test_single_process_replay_uses_the_given_routing_shared_or_not(reference):
    res = reference["single"]
    _check_routing(res)
    assert _max_diff(res["lps"], res["free_lps"]) > 1e-2
    # shared-prefix units replay exactly what the unshared packing replays
    assert _max_diff(res["shared_lps"], res["unshared_lps"]) < TOL
    _same_step(res["shared_metrics"], res["unshared_metrics"], "shared vs unshared")
    assert res["shared_metrics"]["train/routing_prompt_differ"] == 0
    assert res["shared_metrics"]["train/shared_prefix_units"] == 2
    # MegatronPolicy.update with train.routing_replay: the engine's replayed on-policy step
    got, want, free = res["policy_metrics"], res["onpolicy_metrics"], res["onpolicy_free_metrics"]
    _same_step({f"train/{k}": v for k, v in got.items()}, want, "policy update")
    assert abs(want["train/grad_norm"] - free["train/grad_norm"]) > 1e-3  # replay mattered
    assert got["routing_prompt_differ"] == 0 and got["held_after"] == 0, got
    # the backward's re-run of the routers replays the same experts: the same step
    for key in ("metrics", "shared_metrics"):
        _same_step(reference["recompute"][key], res[key], "recompute " + key)


def test_replay_composes_with_tp_sp_cp_ep_pp(moe, reference):
    results = run_distributed(_worker, 4, *moe, FOUR_RANK, timeout=900)[0]
    assert sorted(results) == sorted(FOUR_RANK)
    ref = reference["single"]
    for name, res in results.items():
        _check_routing(res)
        # every token with routing was routed (and checked) exactly once across the ranks
        for key in ("counts", "shared_counts"):
            for k in ("checked", "mismatched", "fallback", "fallback_bad"):
                assert res[key][k] == ref[key][k], (name, key, res[key], ref[key])
        assert _max_diff(res["lps"], ref["lps"]) < TOL, name
        assert _max_diff(res["shared_lps"], ref["unshared_lps"]) < TOL, name
        _same_step(res["metrics"], ref["metrics"], name)
        _same_step(res["shared_metrics"], ref["unshared_metrics"], name)
        if "exchanged_metrics" in res:
            _same_step(res["exchanged_metrics"], res["shared_metrics"], name + " exchanged")
