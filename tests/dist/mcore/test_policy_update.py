"""`MegatronPolicy.update`, the loop's update step, with and without `train.recompute_old_logprobs`.

The on-policy shortcut (old log-probs taken from the training pass, docs/spell-algorithm.md §1.7) and
the recompute (a forward-only pass first, as verl does) must take the same optimizer step on a
`TrainBatch` of trajectories whose completions carry "vLLM's" log-probs: the same loss, grad norm,
weights after the step and train/rollout log-prob gap (computed by the engine in one case, by the
policy in the other). The batch has shared-prompt groups (`train.shared_prefix` is on by default), so
the forward-only pass runs shared units too. One pooled rank, both policies built in it.
"""

from __future__ import annotations

import pytest

from tests.dist.mcore._engine_harness import (
    full_tensors,
    max_abs_diffs,
    responder_batch,
    shared_batch,
    to_numpy,
)
from tests.helpers.convert import convert_to_megatron
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = [pytest.mark.dist]
TOL = 1e-5


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    hf = make_tiny_hf_model(root / "hf", "qwen3", num_hidden_layers=2)
    convert_to_megatron([(hf, root / "ckpt")])
    return str(hf), str(root / "ckpt")


def _updates(rank, world, hf_dir, ckpt):
    from megatron_spell.config import load_config
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel
    from megatron_spell.mcore.policy import MegatronPolicy

    out = {}
    for recompute in (False, True):
        config = load_config(
            None,
            [
                f"model.hf_dir={hf_dir}",
                f"model.load={ckpt}",
                "train.lr=1e-3",
                "train.adam_eps=1e-3",
                "train.recompute=none",
                "train.max_tokens_per_microbatch=64",
                f"train.recompute_old_logprobs={str(recompute).lower()}",
            ],
        )
        ctx = init_parallel(config.parallel)
        policy = MegatronPolicy(config, ctx, load_hf_config(hf_dir))
        before = full_tensors(policy.engine.models, ctx, "data")
        metrics = policy.update(responder_batch(shared_batch()))
        after = full_tensors(policy.engine.models, ctx, "data")
        out[recompute] = to_numpy(
            {"metrics": metrics, "params": after, "moved": max_abs_diffs(before, after)}
        )
        destroy_parallel()
    return out


def test_recompute_old_logprobs_takes_the_shortcut_step(dense):
    (got,) = run_distributed(_updates, 1, *dense, timeout=300)
    short, full = got[False], got[True]
    assert max(short["moved"].values()) > 1e-4  # the step was taken
    assert short["metrics"]["skipped"] == full["metrics"]["skipped"] == 0.0
    assert short["metrics"]["shared_prefix_units"] >= 2
    for key in ("loss", "grad_norm", "logprob_mismatch_mean", "logprob_mismatch_max"):
        assert abs(short["metrics"][key] - full["metrics"][key]) < TOL, key
    assert short["metrics"]["logprob_mismatch_mean"] > 0.1  # "vLLM's" log-probs are 2-6 nats off
    diffs = max_abs_diffs(short["params"], full["params"])
    assert max(diffs.values()) < TOL, max(diffs, key=diffs.get)


def _bf16_resume(rank, world, hf_dir, ckpt, out_dir):
    """bf16 policy: a step, save, a fresh policy loads it; then the same next step on both."""
    from megatron_spell.config import load_config
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel
    from megatron_spell.mcore.policy import MegatronPolicy

    config = load_config(
        None,
        [f"model.hf_dir={hf_dir}", f"model.load={ckpt}", "model.dtype=bf16", "train.lr=1e-3",
         "train.adam_eps=1e-3", "train.recompute=none", "train.max_tokens_per_microbatch=64"],
    )  # fmt: skip
    ctx = init_parallel(config.parallel)
    hf = load_hf_config(hf_dir)
    policy = MegatronPolicy(config, ctx, hf)
    dtypes = sorted({str(p.dtype) for c in policy.chunks for p in c.parameters()})
    batch = responder_batch(shared_batch())
    policy.update(batch)
    policy.save(f"{out_dir}/ck")
    resumed = MegatronPolicy(config, ctx, hf)
    resumed.load(f"{out_dir}/ck")
    params = max_abs_diffs(
        full_tensors(policy.engine.models, ctx, "data"),
        full_tensors(resumed.engine.models, ctx, "data"),
    )

    def main_params(pol):  # the optimizer's fp32 copies of the bf16 weights
        opts = getattr(pol.optimizer, "chained_optimizers", [pol.optimizer])
        return [p for o in opts for g in o.fp32_from_float16_groups for p in g]

    main = [float((a - b).abs().max()) for a, b in zip(main_params(policy), main_params(resumed))]
    nxt, nxt_resumed = policy.update(batch), resumed.update(batch)
    destroy_parallel()
    return to_numpy(
        {"dtypes": dtypes, "params": params, "main": max(main), "next": nxt, "resumed": nxt_resumed}
    )


def test_bf16_checkpoint_saves_and_resumes_exactly(dense, tmp_path):
    """Every parameter is bf16 (the local spec's norms used to stay fp32, and Megatron's
    mixed-precision optimizer could not save their state), and a bf16 run resumes exactly: the same
    weights, fp32 main params and next step."""
    (got,) = run_distributed(_bf16_resume, 1, *dense, str(tmp_path), timeout=300)
    assert got["dtypes"] == ["torch.bfloat16"]
    assert max(got["params"].values()) == 0.0 and got["main"] == 0.0
    for key in ("loss", "grad_norm"):
        assert got["next"][key] == got["resumed"][key], key
