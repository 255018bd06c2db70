"""Tests for megatron_spell/mcore/cpu_support.py: Megatron-Core GPTModel runs on CPU after the patches."""

from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed

torch = pytest.importorskip("torch")
if torch.cuda.is_available():  # the patches are a no-op with CUDA; these checks are CPU-only
    pytest.skip("CPU-only checks", allow_module_level=True)


def _tiny_gpt(moe: bool, **overrides):  # noqa: ANN202
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=4 if moe else None,
        moe_router_topk=2,
        moe_ffn_hidden_size=32 if moe else None,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        **overrides,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=cfg.num_moe_experts, qk_layernorm=True, normalization="RMSNorm"
    )
    return GPTModel(
        cfg, spec, vocab_size=128, max_sequence_length=64, position_embedding_type="rope"
    )


def _fwd_bwd_rank(rank: int, world_size: int, moe: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = _tiny_gpt(moe)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    pos = torch.arange(12).expand(2, 12)
    logits = model(ids, pos, None)  # no mask: the patched default causal mask on CPU
    assert logits.shape == (2, 12, 128) and logits.device.type == "cpu"
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    # With top-2 of 4 experts some expert may get no token; every other parameter must get a grad.
    assert all(".experts." in n for n in no_grad), no_grad
    # Causality: changing the last token must not change earlier positions' logits.
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 128
    with torch.no_grad():
        a, b = model(ids, pos, None), model(ids2, pos, None)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    ps.destroy_model_parallel()


def _cuda_calls_rank(rank: int, world_size: int) -> None:
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert (
        torch.ones(1).cuda().device.type == "cpu" and torch.ones(1).to("cuda").device.type == "cpu"
    )
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    s = torch.cuda.Stream()
    assert isinstance(s, torch.cuda.Stream)  # still a class (transformers annotates with it)
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
    torch.cuda.Event().record()


def _import_has_no_side_effect_then_patch() -> None:
    """Importing our Megatron modules patches nothing; the explicit call afterwards patches every place."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    from torch.overrides import _get_current_function_mode_stack

    import megatron_spell.mcore.checkpoint
    import megatron_spell.mcore.model
    import megatron_spell.mcore.optimizer
    import megatron_spell.mcore.parallel
    import megatron_spell.mcore.train_step  # noqa: F401
    from megatron_spell.mcore.cpu_support import apply_cpu_patches

    assert not _get_current_function_mode_stack()
    with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA enabled"
        torch.zeros(1, device="cuda")
    originals = (
        fused_softmax.get_default_causal_mask,
        optimizer_module.clip_grad_by_total_norm_fp32,
        token_dispatcher.maybe_move_tensor_to_cpu,
        mrandom.model_parallel_cuda_manual_seed,
    )
    # Megatron's own clip asserts CUDA gradients: the reason for its patch.
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    with pytest.raises(AssertionError):
        originals[1]([p], 1.0, 4.0)

    apply_cpu_patches()
    apply_cpu_patches()  # idempotent: one mode entered
    assert len(_get_current_function_mode_stack()) == 1
    # Modules imported before the call (by name, `from x import f`) see the patched functions too.
    patched = (
        utils.get_default_causal_mask,
        clip_grads.clip_grad_by_total_norm_fp32,
        moe_utils.maybe_move_tensor_to_cpu,
        megatron_spell.mcore.parallel.tensor_parallel.model_parallel_cuda_manual_seed,
    )
    now = (
        fused_softmax.get_default_causal_mask,
        optimizer_module.clip_grad_by_total_norm_fp32,
        token_dispatcher.maybe_move_tensor_to_cpu,
        mrandom.model_parallel_cuda_manual_seed,
    )
    for before, after, source in zip(originals, now, patched, strict=True):
        assert after is source and after is not before


def _clip_rank() -> None:
    """The patched clip scales CPU grads as torch's clip_grad_norm_ does (it clips by the given norm)."""
    from megatron.core.optimizer import optimizer as optimizer_module

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 5
    ref = [p.grad.clone() for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for rp, g in zip(ref_params, ref, strict=True):
        rp.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref_params, max_norm=1.0)
    optimizer_module.clip_grad_by_total_norm_fp32(params, 1.0, float(total))
    for p, rp in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-5, atol=1e-6)
    before = [p.grad.clone() for p in params]  # a norm under max_norm leaves the grads as they are
    optimizer_module.clip_grad_by_total_norm_fp32(params, 1e9, float(total))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before, strict=True))


def _recompute_rank() -> None:
    """Full activation recompute (train.recompute=full) runs on CPU and gives the same gradients."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_spell.mcore.train_step import recompute_overrides

    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    plain = _tiny_gpt(False)
    again = _tiny_gpt(False, **recompute_overrides("full"))
    again.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    pos = torch.arange(12).expand(2, 12)
    for model in (plain, again):
        model.train()
        model(ids, pos, None).float().square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), again.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    ps.destroy_model_parallel()


def _all_checks_rank(rank: int, world_size: int) -> None:
    _import_has_no_side_effect_then_patch()
    _cuda_calls_rank(rank, world_size)
    _clip_rank()
    _fwd_bwd_rank(rank, world_size, False)
    _fwd_bwd_rank(rank, world_size, True)
    _recompute_rank()


def test_cpu_patches_gpt_dense_and_moe_forward_backward() -> None:
    # One spawned process for all checks: importing megatron dominates the time.
    run_distributed(_all_checks_rank, 1, timeout=240, fresh=True)
