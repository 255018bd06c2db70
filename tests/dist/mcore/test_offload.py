"""`mcore/offload.py`: moving Megatron's training state off and back between two updates is exact.

Two engines start from the same checkpoint. A runs step, step; B runs step, offloads grads, params
and optimizer, onloads them, then step. After the second step B's parameters and optimizer state
(Adam moments, fp32 main params) must equal A's bit for bit. On the way B checks that the grad
buffers' storage is really freed (0 bytes, `main_grad` views included) and comes back at its size
and zeroed, that a second offload and an onload without an offload do nothing, and that on CPU
the param and optimizer moves are no-ops unless forced. `force=True` runs the GPU path's copies and
frees on host memory, so the CPU run checks that every freed storage is restored and refilled.

Layouts: one rank (fp32 with the plain optimizer, bf16 with the mixed-precision and with the
distributed optimizer); two ranks with the distributed optimizer, whose fp32 shards are views of
the DDP `param_data`: dense at DP=2, and a MoE model at EP=2 whose experts sit in the
expert-parallel buffers.
"""

from __future__ import annotations

import pytest

from tests.dist.mcore._engine_harness import fixed_batch, layout
from tests.helpers.convert import convert_to_megatron
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = [pytest.mark.dist]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    dense = make_tiny_hf_model(root / "qwen3", "qwen3", num_hidden_layers=2)
    moe = make_tiny_hf_model(root / "moe", "qwen3_moe")
    paths = {"dense": (dense, root / "qwen3_ckpt"), "moe": (moe, root / "moe_ckpt")}
    convert_to_megatron(paths.values())
    return {k: (str(hf), str(ckpt)) for k, (hf, ckpt) in paths.items()}


# --- workers (module level: spawned) --------------------------------------------------------------


def _engine(hf_dir, ckpt, ctx, dtype_name, dist_opt):
    """A PolicyEngine with its optimizer over `ckpt` (in `ctx`, which is shared by the engines)."""
    import torch

    from megatron_spell.config import TrainConfig
    from megatron_spell.mcore.attention import PackedCPAttention
    from megatron_spell.mcore.checkpoint import load_checkpoint
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.optimizer import build_optimizer, wrap_ddp
    from megatron_spell.mcore.train_step import PolicyEngine

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    train = TrainConfig(
        lr=1e-3,
        adam_eps=1e-3,
        use_distributed_optimizer=dist_opt,
        logprob_chunk_size=8,
        max_tokens_per_microbatch=64,
        shared_prefix=False,
    )
    hf = load_hf_config(hf_dir)
    models = build_model(hf, ctx, dtype=dtype, core_attention=PackedCPAttention)
    load_checkpoint(models, ckpt)
    ddp = wrap_ddp(models, ctx, use_distributed_optimizer=dist_opt)
    opt = build_optimizer(ddp, train, ctx)
    return PolicyEngine(
        ddp, ctx, train, temperature=0.7, vocab_size=hf.vocab_size, pad_token_id=0, optimizer=opt
    )


def _state(engine):
    """This rank's parameters, fp32 main params and optimizer state, as flat fp32 tensors."""
    from megatron_spell.mcore import offload

    out = {}
    for i, chunk in enumerate(engine.models):
        for name, p in chunk.named_parameters():
            out[f"{i}.{name}"] = p.detach().float().clone().flatten()
    for j, member in enumerate(offload._members(engine.optimizer)):
        for k, t in enumerate(offload._optimizer_tensors(member)):
            out[f"opt{j}.{k}"] = t.detach().float().clone().flatten()
    return out


def _grad_storages(engine):
    from megatron_spell.mcore import offload

    return [b.grad_data.untyped_storage() for b in offload._buffers(engine.models)]


def _storage_bytes(tensors):
    return [t.untyped_storage().nbytes() for t in tensors]


def _offload_roundtrip(engine, force):
    """Offload everything, check what was freed, onload, check it is back; returns the checks."""
    import torch

    from megatron_spell.mcore import offload

    ddp, opt = engine.models, engine.optimizer
    params = [p for chunk in ddp for p in chunk.parameters()]
    opt_tensors = [t for m in offload._members(opt) for t in offload._optimizer_tensors(m)]
    grad_sizes = [s.nbytes() for s in _grad_storages(engine)]
    param_sizes, opt_sizes = _storage_bytes(params), _storage_bytes(opt_tensors)
    c = {
        "n_buffers": len(grad_sizes),
        "n_expert_buffers": sum(len(chunk.expert_parallel_buffers) for chunk in ddp),
        "grads_nonzero_before": any(
            bool(b.grad_data.abs().sum() > 0) for b in offload._buffers(ddp)
        ),
        "n_opt_tensors": len(opt_tensors),
    }
    c["grads_freed"] = offload.offload_grads(ddp)
    c["grad_bytes"] = sum(grad_sizes)
    c["grad_storage_after"] = [s.nbytes() for s in _grad_storages(engine)]
    c["main_grad_after"] = max(p.main_grad.untyped_storage().nbytes() for p in params)
    c["grads_freed_again"] = offload.offload_grads(ddp)
    c["params_moved"] = offload.offload_params(ddp, force=force)
    c["params_moved_again"] = offload.offload_params(ddp, force=force)
    c["param_storage_after"] = max(_storage_bytes(params))
    c["opt_moved"] = offload.offload_optimizer(opt, force=force)
    c["opt_moved_again"] = offload.offload_optimizer(opt, force=force)
    c["opt_storage_after"] = max(_storage_bytes(opt_tensors))
    c["grads_restored"] = offload.onload_grads(ddp)
    c["params_restored"] = offload.onload_params(ddp)
    c["opt_restored"] = offload.onload_optimizer(opt)
    c["onload_again"] = (
        offload.onload_grads(ddp) + offload.onload_params(ddp) + offload.onload_optimizer(opt)
    )
    c["grad_sizes_ok"] = [s.nbytes() for s in _grad_storages(engine)] == grad_sizes
    c["param_sizes_ok"] = _storage_bytes(params) == param_sizes
    c["opt_sizes_ok"] = _storage_bytes(opt_tensors) == opt_sizes
    c["grads_zero_after"] = all(
        bool(torch.count_nonzero(b.grad_data) == 0) for b in offload._buffers(ddp)
    )
    return c


def _exactness(rank, world, hf_dir, ckpt, par_kw, dtype_name, dist_opt, forces):
    """A: step, step. B (one per `force`): step, offload + onload, step. Diffs against A."""
    from megatron_spell.mcore import offload
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(layout(**par_kw))
    batch = fixed_batch()
    a = _engine(hf_dir, ckpt, ctx, dtype_name, dist_opt)
    a.train_step(batch)
    first = _state(a)
    a.train_step(batch)
    ref = _state(a)
    out = {}
    for force in forces:
        b = _engine(hf_dir, ckpt, ctx, dtype_name, dist_opt)
        # onload before any offload: nothing to do, nothing broken
        never = offload.onload_grads(b.models) + offload.onload_params(b.models)
        never += offload.onload_optimizer(b.optimizer)
        b.train_step(batch)
        checks = _offload_roundtrip(b, force)
        checks["onload_never_offloaded"] = never
        after_first = _state(b)
        checks["first_step_diff"] = max(
            float((after_first[k] - first[k]).abs().max()) for k in first
        )
        m = b.train_step(batch)
        got = _state(b)
        assert set(got) == set(ref)
        checks["moved"] = max(float((ref[k] - first[k]).abs().max()) for k in ref)
        checks["diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        checks["skipped"] = m["train/skipped"]
        out[force] = checks
    destroy_parallel()
    return out


# --- tests ----------------------------------------------------------------------------------------


def _check(c, force):
    assert c["n_buffers"] >= 1 and c["grads_nonzero_before"], c
    # the grads are really freed, views included, and a second offload does nothing
    assert c["grads_freed"] == c["grad_bytes"] > 0, c
    assert c["grad_storage_after"] == [0] * c["n_buffers"] and c["main_grad_after"] == 0, c
    assert c["grads_freed_again"] == 0 and c["params_moved_again"] == 0, c
    assert c["opt_moved_again"] == 0, c
    if force:  # the GPU path on host memory: copied out and freed
        assert c["params_moved"] > 0 and c["param_storage_after"] == 0, c
        assert c["opt_moved"] > 0 and c["opt_storage_after"] == 0, c
    else:  # CPU: params and optimizer state stay where they are
        assert c["params_moved"] == 0 and c["param_storage_after"] > 0, c
        assert c["opt_moved"] == 0 and c["opt_storage_after"] > 0, c
    assert c["grads_restored"] == c["grads_freed"], c
    assert c["params_restored"] == c["params_moved"], c
    assert c["opt_restored"] == c["opt_moved"], c
    assert c["onload_again"] == 0 and c["onload_never_offloaded"] == 0, c
    assert c["grad_sizes_ok"] and c["param_sizes_ok"] and c["opt_sizes_ok"], c
    assert c["grads_zero_after"], c
    # the second step after the round trip is the second step without it
    assert c["first_step_diff"] == 0.0 and c["moved"] > 1e-4 and c["skipped"] == 0.0, c
    assert c["diff"] <= 1e-7, c


@pytest.mark.parametrize(("dtype", "dist_opt"), [("fp32", False), ("bf16", False), ("bf16", True)])
def test_offload_roundtrip_is_exact_one_rank(models, dtype, dist_opt):
    (got,) = run_distributed(
        _exactness, 1, *models["dense"], {}, dtype, dist_opt, (False, True), timeout=300
    )
    for force, checks in got.items():
        _check(checks, force)
        assert checks["n_opt_tensors"] > 0, checks


def test_offload_roundtrip_moe_ep2_expert_buffers(models):
    ep2 = {"expert_model_parallel_size": 2}
    got = run_distributed(_exactness, 2, *models["moe"], ep2, "fp32", True, (True,), timeout=300)
    for rank_out in got:
        assert rank_out[True]["n_expert_buffers"] >= 1, rank_out
        _check(rank_out[True], True)


def test_offload_roundtrip_dp2_distributed_optimizer(models):
    got = run_distributed(_exactness, 2, *models["dense"], {}, "fp32", True, (True,), timeout=300)
    for rank_out in got:
        _check(rank_out[True], True)
