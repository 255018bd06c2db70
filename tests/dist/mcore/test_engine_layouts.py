"""Training engine on gloo: loss and every gradient are invariant across parallel layouts.

A tiny Qwen3 (4 layers, GQA, q/k norms) and a tiny Qwen3-MoE are converted once to Megatron checkpoints, so
every layout starts from the same weights. The single-process run is the reference; it is itself checked
against Hugging Face transformers (log-probs at the rollout temperature and the PPO loss recomputed from HF
log-probs), against per-sequence micro-batches (packed == unpacked), and for the direction of one update.
Layouts run grouped per spawned job (process start-up dominates on 2 cores). A 4-layer tied Qwen3 at
PP=2 and PP=2 x VPP=2 checks both copies of the tied embedding.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tests.dist.mcore._engine_harness import (
    fixed_batch,
    full_tensors,
    layout,
    make_engine,
    max_abs_diffs,
    shared_batch,
    to_numpy,
)
from tests.helpers.convert import convert_to_megatron
from tests.helpers.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("engine")
    dense = make_tiny_hf_model(root / "qwen3", "qwen3", num_hidden_layers=4)
    moe = make_tiny_hf_model(root / "moe", "qwen3_moe")
    tied = make_tiny_hf_model(root / "tied", "qwen3", tied=True, num_hidden_layers=4)
    paths = {"dense": (dense, root / "qwen3_ckpt"), "moe": (moe, root / "moe_ckpt")}
    paths["tied"] = (tied, root / "tied_ckpt")
    convert_to_megatron(paths.values())
    return {k: (str(hf), str(ckpt)) for k, (hf, ckpt) in paths.items()}


# --- workers (module level: spawned) ----------------------------------------------------------------


# Rollout correction on the on-policy step, the batch's old_logprobs acting as vLLM's: they lie 0-4
# nats above the tiny model's, so every part acts (geometric weights truncated both ways, tokens
# masked, sequences vetoed); the sequence sums must be reduced over the CP split.
CORRECTION = dict(
    rollout_is="geometric",
    rollout_is_threshold=(0.08, 0.2),
    rollout_rs="token",
    rollout_rs_threshold=(0.03, 1.0),
    rollout_token_veto_threshold=0.02,
)
ROLES = ("responder", "responder", "questioner", "verifier", "questioner", "responder")
# shared_batch: groups a (samples 0, 2, 3, 5) and b (1, 6) share prompts, c (4) stands alone
SHARED_ROLES = ("responder", "verifier", "responder", "responder", "questioner", "responder")
SHARED_ROLES += ("verifier",)


def _batch(shared: bool, roles: bool = False) -> list:
    batch = shared_batch() if shared else fixed_batch()
    names = SHARED_ROLES if shared else ROLES
    return [dataclasses.replace(s, role=r) for s, r in zip(batch, names)] if roles else batch


def _step_and_gather(hf_dir, ckpt, par, **kw):
    """One train step (and, on the shared-prefix batch, the forward-only log-probs first)."""
    from megatron_spell.mcore.parallel import destroy_parallel

    on_policy = kw.pop("on_policy", False)
    if kw.pop("correction", False):
        kw.update(CORRECTION)
    shared = kw.pop("batch", "fixed") == "shared"
    engine, ctx = make_engine(hf_dir, ckpt, par, **kw)
    batch = _batch(shared, roles="rollout_is" in kw)
    lps = engine.compute_logprobs(batch) if shared else None
    metrics = engine.train_step(batch, on_policy=on_policy)
    grads = None if kw.get("dist_opt") else full_tensors(engine.models, ctx, "main_grad")
    params = full_tensors(engine.models, ctx, "data")
    destroy_parallel()
    return to_numpy({"metrics": metrics, "grads": grads, "params": params, "lp": lps})


def _reference_worker(rank, world, dense, moe):
    from transformers import AutoModelForCausalLM

    from megatron_spell.config import TrainConfig
    from megatron_spell.mcore.loss import policy_loss
    from megatron_spell.mcore.parallel import destroy_parallel

    out = {"dense": _step_and_gather(*dense, layout()), "moe": _step_and_gather(*moe, layout())}
    # packed == unpacked: a budget so small that every sequence is its own micro-batch
    out["dense_unpacked"] = _step_and_gather(*dense, layout(), budget=34)
    # on-policy shortcut: old log-probs from the training pass; the batch's old_logprobs act as vLLM's
    out["dense_onpolicy"] = _step_and_gather(*dense, layout(), on_policy=True)
    out["dense_corr"] = _step_and_gather(*dense, layout(), on_policy=True, correction=True)

    # log-probs and loss against HF transformers at the rollout temperature
    engine, _ = make_engine(*dense, layout(), budget=256, lr=1e-3, adam_eps=1e-8)
    batch = fixed_batch()
    lps = engine.compute_logprobs(batch)
    hf = AutoModelForCausalLM.from_pretrained(dense[0], dtype=torch.float32).eval()
    hf_lps = []
    with torch.no_grad():
        for s in batch:
            logits = hf(torch.tensor([s.prompt_ids + s.response_ids])).logits[0] / 0.7
            p = len(s.prompt_ids)
            logp = torch.log_softmax(logits.float(), -1)[p - 1 : -1]
            hf_lps.append(logp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1))
    out["lp_vs_hf"] = max(float((a - b).abs().max()) for a, b in zip(lps, hf_lps))
    n = sum(len(s.response_ids) for s in batch)
    cat = torch.cat
    hf_loss, _ = policy_loss(
        cat(hf_lps),
        cat([torch.tensor(s.old_logprobs) for s in batch]),
        cat([torch.full((len(s.response_ids),), s.advantage) for s in batch]),
        torch.full((n,), 1.0 / n),
        TrainConfig(),
    )
    metrics = engine.train_step(batch)
    out["loss_vs_hf"] = abs(metrics["train/loss"] - float(hf_loss))
    out["corr_vs_hf"] = _corrected_loss_from_hf(batch, hf_lps, out["dense_corr"]["metrics"])
    # on-policy update (old = current log-probs, as in SPELL): direction of the change per sample
    # adam_eps 1e-3 (as in the layout runs): a first Adam step at a tiny eps is ~lr * sign(grad), so the
    # weights would only compare the gradients' signs
    engine, ctx = make_engine(*dense, layout(), budget=256, lr=1e-3)
    on_policy = [dataclasses.replace(s, old_logprobs=lp.tolist()) for s, lp in zip(batch, lps)]
    m_recompute = engine.train_step(on_policy)
    after = engine.compute_logprobs(batch)
    p_recompute = full_tensors(engine.models, ctx, "data")
    # the same step without the recompute pass: identical loss, gradients and weights; the mismatch
    # metric compares the training pass's log-probs with the given ("rollout") ones
    fast, fast_ctx = make_engine(*dense, layout(), budget=256, lr=1e-3)
    roles = ["responder", "questioner", "verifier"]  # per-role mismatch metrics
    m_fast = fast.train_step(
        [dataclasses.replace(s, role=roles[i % 3]) for i, s in enumerate(batch)], on_policy=True
    )
    p_fast = full_tensors(fast.models, fast_ctx, "data")
    diffs = [(lp - torch.tensor(s.old_logprobs)).abs() for s, lp in zip(batch, lps)]
    by_role = {r: torch.cat(diffs[i::3]) for i, r in enumerate(roles) if diffs[i::3]}
    out["shortcut"] = {
        "loss": abs(m_recompute["train/loss"] - m_fast["train/loss"]),
        "grad_norm": abs(m_recompute["train/grad_norm"] - m_fast["train/grad_norm"]),
        "params": max(float((p_recompute[k] - p_fast[k]).abs().max()) for k in p_fast),
        "mismatch_mean": abs(
            m_fast["train/logprob_mismatch_mean"] - float(torch.cat(diffs).mean())
        ),
        "mismatch_max": abs(m_fast["train/logprob_mismatch_max"] - float(torch.cat(diffs).max())),
        "no_mismatch_without_flag": "train/logprob_mismatch_mean" not in m_recompute,
        "role_mismatch": max(
            max(
                abs(m_fast[f"train/logprob_mismatch_mean/{r}"] - float(d.mean())),
                abs(m_fast[f"train/logprob_mismatch_max/{r}"] - float(d.max())),
            )
            for r, d in by_role.items()
        ),
        "roles": sorted(k for k in m_fast if k.startswith("train/logprob_mismatch_mean/")),
    }
    out["delta_by_adv"] = [
        (s.advantage, float((b - a).mean())) for s, a, b in zip(batch, lps, after)
    ]
    # a non-finite loss skips the step (and is counted) instead of corrupting the weights
    bad = [dataclasses.replace(batch[0], advantage=float("nan")), *batch[1:]]
    m = engine.train_step(bad)
    again = engine.compute_logprobs(batch)
    unchanged = max(float((a - b).abs().max()) for a, b in zip(after, again))
    out["skip"] = (m["train/skipped"], m["train/num_skipped_steps"], unchanged)
    destroy_parallel()
    out.update(_shared_prefix_runs(dense, hf))
    return out


# shared-prefix packing of `shared_batch` against its unshared single-process run ("dense_shared");
# budget 30 (16 per rank at CP=2) splits the group of four responses by the token budget
SHARED = {"batch": "shared", "shared_prefix": True}
CORR = {"on_policy": True, "correction": True}


def _hf_logprobs(hf, batch, temperature=0.7):
    out = []
    with torch.no_grad():
        for s in batch:
            logits = hf(torch.tensor([s.prompt_ids + s.response_ids])).logits[0] / temperature
            p = len(s.prompt_ids)
            logp = torch.log_softmax(logits.float(), -1)[p - 1 : -1]
            out.append(logp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1))
    return out


def _shared_prefix_runs(dense, hf):
    """Shared vs unshared at TP=1 (whole units, and units split by the budget), log-probs against HF,
    and the same comparison with a deliberately broken mask (siblings visible) and broken positions
    (responses restarting at 0), which must differ."""
    from unittest import mock

    from megatron_spell.mcore import attention, packing

    out = {
        "dense_shared": _step_and_gather(*dense, layout(), batch="shared", budget=256),
        "shared_tp1": _step_and_gather(*dense, layout(), **SHARED, budget=256),
        "shared_tp1_split": _step_and_gather(*dense, layout(), **SHARED, budget=30),
        # the rollout correction's sequence sums, veto and per-role metrics by response in a unit
        "dense_shared_corr": _step_and_gather(*dense, layout(), batch="shared", **CORR, budget=256),
        "shared_corr_tp1": _step_and_gather(*dense, layout(), **SHARED, **CORR, budget=30),
    }
    hf_lps = _hf_logprobs(hf, shared_batch())
    out["shared_lp_vs_hf"] = max(
        float(abs(a - b.numpy()).max()) for a, b in zip(out["shared_tp1"]["lp"], hf_lps)
    )
    siblings = mock.patch.object(attention, "key_ranges", lambda segs, i, end: [(segs[0], end)])
    restart = mock.patch.object(packing, "response_positions", lambda p, r: torch.arange(r))
    for name, patch in (("broken_siblings", siblings), ("broken_positions", restart)):
        with patch:
            out[name] = _step_and_gather(*dense, layout(), **SHARED, budget=256)
    return out


def _corrected_loss_from_hf(batch, hf_lps, metrics) -> dict:
    """The corrected on-policy loss and metrics recomputed from HF log-probs, sequence by sequence
    with plain floats (docs/spell-algorithm.md §5: on-policy the GRPO token loss is -A, times the
    factor; token mean over all response tokens)."""
    c = CORRECTION
    lo, hi = c["rollout_is_threshold"]
    rlo, rhi = c["rollout_rs_threshold"]
    n = sum(len(s.response_ids) for s in batch)
    total = weight = masked = 0.0
    by_role: dict[str, list[float]] = {}
    for s, lp, role in zip(batch, hf_lps, ROLES):
        lr = [a - b for a, b in zip(lp.tolist(), s.old_logprobs)]
        geo = math.exp(sum(lr) / len(lr))
        w = min(max(geo, lo), hi)
        vetoed = any(math.exp(x) < c["rollout_token_veto_threshold"] for x in lr)
        for x in lr:
            f = 0.0 if vetoed or not rlo <= math.exp(x) <= rhi else w
            total += -s.advantage * f / n
            weight += f
            masked += f == 0.0
            by_role.setdefault(role, []).append(f)
    return {
        "loss": abs(metrics["train/loss"] - total),
        "weight_mean": abs(metrics["train/rollout_corr/weight_mean"] - weight / n),
        "masked_frac": abs(metrics["train/rollout_corr/masked_frac"] - masked / n),
        "roles": {
            r: abs(metrics[f"train/rollout_corr/{r}/weight_mean"] - sum(f) / len(f))
            for r, f in by_role.items()
        },
        "acts": (
            metrics["train/rollout_corr/truncated_frac"],
            metrics["train/rollout_corr/masked_frac"],
            metrics["train/rollout_corr/vetoed_frac"],
        ),
    }


TWO_RANK_LAYOUTS = {
    "tp2": ("dense", dict(tensor_model_parallel_size=2), {}),
    "tp2_sp": ("dense", dict(tensor_model_parallel_size=2, sequence_parallel=True), {}),
    "pp2": ("dense", dict(pipeline_model_parallel_size=2), {}),
    "pp2_vpp2": (
        "dense",
        dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        {},
    ),
    "cp2": ("dense", dict(context_parallel_size=2), {}),
    "dp2": ("dense", {}, {}),
    "dp2_distopt": ("dense", {}, {"dist_opt": True}),
    "ep2": ("moe", dict(expert_model_parallel_size=2), {}),
    # the on-policy step (no recompute pass) with its mismatch metric reduced over PP and CP
    "pp2_onpolicy": ("dense_onpolicy", dict(pipeline_model_parallel_size=2), {"on_policy": True}),
    "cp2_onpolicy": ("dense_onpolicy", dict(context_parallel_size=2), {"on_policy": True}),
    "tp2_sp_shared": (
        "dense_shared",
        dict(tensor_model_parallel_size=2, sequence_parallel=True),
        {**SHARED, "budget": 30},
    ),
    "pp2_shared": ("dense_shared", dict(pipeline_model_parallel_size=2), {**SHARED, "budget": 30}),
    "pp2_vpp2_shared": (
        "dense_shared",
        dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        {**SHARED, "budget": 30},
    ),
    "cp2_shared": ("dense_shared", dict(context_parallel_size=2), {**SHARED, "budget": 16}),
    "cp2_shared_corr": (
        "dense_shared_corr",
        dict(context_parallel_size=2),
        {**SHARED, **CORR, "budget": 16},
    ),
    # the rollout correction: sequence sums over the CP split, metrics over PP and DP x CP
    "cp2_corr": (
        "dense_corr",
        dict(context_parallel_size=2),
        {"on_policy": True, "correction": True},
    ),
    "pp2_corr": (
        "dense_corr",
        dict(pipeline_model_parallel_size=2),
        {"on_policy": True, "correction": True},
    ),
}
# Tied embeddings: the first stage's word_embeddings and the last stage's output_layer are two copies of
# one weight, kept equal by Megatron's embedding-group gradient all-reduce.
TIED_LAYOUTS = {
    "pp2_tied": ("tied", dict(pipeline_model_parallel_size=2), {}),
    "pp2_vpp2_tied": (
        "tied",
        dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        {},
    ),
}
FOUR_RANK_LAYOUTS = {
    "tp2_cp2": ("dense", dict(tensor_model_parallel_size=2, context_parallel_size=2), {}),
    "tp2_cp2_sp_distopt": (
        "dense",
        dict(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True),
        {"dist_opt": True},
    ),
    "tp2_cp2_shared": (
        "dense_shared",
        dict(tensor_model_parallel_size=2, context_parallel_size=2),
        {**SHARED, "budget": 16},
    ),
}


def _layouts_worker(rank, world, paths, layouts):
    out = {}
    for name, (model, par, kw) in layouts.items():
        res = _step_and_gather(*paths[model.split("_")[0]], layout(**par), **kw)
        if rank == 0:
            out[name] = res
    return out


def _tied_reference_worker(rank, world, tied):
    return {"tied": _step_and_gather(*tied, layout())}


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(models):
    return run_distributed(_reference_worker, 1, models["dense"], models["moe"], timeout=600)[0]


def test_reference_matches_hf_and_improves(reference):
    assert reference["lp_vs_hf"] < 1e-5
    assert reference["loss_vs_hf"] < 1e-6
    for adv, delta in reference["delta_by_adv"]:
        assert (delta > 0) == (adv > 0), reference["delta_by_adv"]
    assert reference["skip"] == (1.0, 1.0, 0.0)


def test_rollout_correction_matches_hf_recomputation(reference):
    got = reference["corr_vs_hf"]
    truncated, masked, vetoed = got.pop("acts")
    assert 0 < truncated < 1 and 0 < vetoed < masked < 1, (truncated, masked, vetoed)
    roles = got.pop("roles")
    assert set(roles) == {"responder", "questioner", "verifier"}
    assert all(v < TOL for v in [*got.values(), *roles.values()]), (got, roles)
    # the correction changed the step: a different loss than the uncorrected on-policy one
    plain, corr = reference["dense_onpolicy"]["metrics"], reference["dense_corr"]["metrics"]
    assert abs(plain["train/loss"] - corr["train/loss"]) > 1e-3
    assert "train/rollout_corr/weight_mean" not in plain


def test_on_policy_shortcut_equals_recompute(reference):
    got = dict(reference["shortcut"])
    assert got.pop("no_mismatch_without_flag")
    roles = ["questioner", "responder", "verifier"]
    assert got.pop("roles") == [f"train/logprob_mismatch_mean/{r}" for r in roles]
    assert all(v < TOL for v in got.values()), got


def test_packed_equals_unpacked(reference):
    a, b = reference["dense"], reference["dense_unpacked"]
    assert b["metrics"]["train/num_microbatches"] == 6
    assert a["metrics"]["train/num_microbatches"] < 6
    assert abs(a["metrics"]["train/loss"] - b["metrics"]["train/loss"]) < TOL
    assert max(max_abs_diffs(a["grads"], b["grads"]).values()) < TOL


def _with_tied_copy(ref: dict, got: dict) -> dict:
    """The reference's tensors, plus the last stage's copy of a tied embedding where `got` has one (the
    single-process model holds the tied weight once, as the embedding)."""
    if "output_layer.weight" in got and "output_layer.weight" not in ref:
        return {**ref, "output_layer.weight": ref["embedding.word_embeddings.weight"]}
    return ref


def _check(reference, results, layouts):
    for name, (model, _par, _kw) in layouts.items():
        ref, got = reference[model], results[name]
        assert abs(ref["metrics"]["train/loss"] - got["metrics"]["train/loss"]) < TOL, name
        assert got["metrics"]["train/num_tokens"] == ref["metrics"]["train/num_tokens"], name
        corr = [
            k
            for k in ref["metrics"]
            if k.startswith(("train/rollout_corr/", "train/logprob_mismatch_"))
        ]
        for key in ("train/logprob_mismatch_mean", "train/logprob_mismatch_max", *corr):
            assert (key in got["metrics"]) == (key in ref["metrics"]), (name, key)
            if key in ref["metrics"]:
                assert abs(ref["metrics"][key] - got["metrics"][key]) < TOL, (name, key)
        assert abs(ref["metrics"]["train/grad_norm"] - got["metrics"]["train/grad_norm"]) < 1e-4, (
            name
        )
        if got["grads"] is not None:
            diffs = max_abs_diffs(_with_tied_copy(ref["grads"], got["grads"]), got["grads"])
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] < TOL, (name, worst, diffs[worst])
        diffs = max_abs_diffs(_with_tied_copy(ref["params"], got["params"]), got["params"])
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] < TOL, (name, "params after step", worst, diffs[worst])
        if ref["lp"] is not None:  # per-token log-probs of the forward-only pass
            lp = max(float(abs(a - b).max(initial=0.0)) for a, b in zip(ref["lp"], got["lp"]))
            assert lp < TOL, (name, "log-probs", lp)
        if _kw.get("shared_prefix"):
            assert got["metrics"]["train/shared_prefix_units"] >= 2, name
            assert (
                got["metrics"]["train/num_model_tokens"] < ref["metrics"]["train/num_model_tokens"]
            )


SHARED_TP1 = {
    "shared_tp1": ("dense_shared", {}, {**SHARED, "budget": 256}),
    "shared_tp1_split": ("dense_shared", {}, {**SHARED, "budget": 30}),
    "shared_corr_tp1": ("dense_shared_corr", {}, {**SHARED, **CORR, "budget": 30}),
}


def test_shared_prefix_equals_unshared_single_process(reference):
    """Same loss, gradients, weights after the step and log-probs; the split run made extra units and
    packed two single responses as ordinary sequences; a broken mask or positions change the loss."""
    _check(reference, reference, SHARED_TP1)
    assert reference["shared_lp_vs_hf"] < 1e-5
    split = reference["shared_tp1_split"]["metrics"]
    assert (split["train/shared_prefix_split_units"], split["train/shared_prefix_fallback"]) == (
        2,
        2,
    )
    corr = reference["dense_shared_corr"]["metrics"]  # the correction acts, on every role
    assert {f"train/rollout_corr/{r}/weight_mean" for r in set(SHARED_ROLES)} <= set(corr)
    assert 0 < corr["train/rollout_corr/vetoed_frac"] < corr["train/rollout_corr/masked_frac"] < 1
    ref = reference["dense_shared"]
    for name in ("broken_siblings", "broken_positions"):
        got = reference[name]
        lp = max(float(abs(a - b).max(initial=0.0)) for a, b in zip(ref["lp"], got["lp"]))
        assert lp > 1e-3, (name, lp)
        diffs = max_abs_diffs(ref["grads"], got["grads"])
        assert max(diffs.values()) > 1e-4, name


def test_two_rank_layouts_match_reference(models, reference):
    results = run_distributed(_layouts_worker, 2, models, TWO_RANK_LAYOUTS, timeout=900)[0]
    _check(reference, results, TWO_RANK_LAYOUTS)


def test_four_rank_layouts_match_reference(models, reference):
    results = run_distributed(_layouts_worker, 4, models, FOUR_RANK_LAYOUTS, timeout=900)[0]
    _check(reference, results, FOUR_RANK_LAYOUTS)


@pytest.fixture(scope="module")
def tied_reference(models):
    return run_distributed(_tied_reference_worker, 1, models["tied"], timeout=300)[0]


def test_tied_embeddings_under_pp_match_reference(models, tied_reference):
    """Both copies of the tied embedding (first stage's word_embeddings, last stage's output_layer) get
    the full gradient and equal the single-process embedding after the step."""
    assert "output_layer.weight" not in tied_reference["tied"]["params"]
    results = run_distributed(_layouts_worker, 2, models, TIED_LAYOUTS, timeout=600)[0]
    for name in TIED_LAYOUTS:
        for kind in ("grads", "params"):
            have = results[name][kind]
            assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= set(have), name
    _check(tied_reference, results, TIED_LAYOUTS)
