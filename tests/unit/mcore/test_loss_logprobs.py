"""Policy loss against a literal transcription of the docs/spell-algorithm.md §5 formula; chunked
log-probs against log_softmax."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_spell.config import TrainConfig
from megatron_spell.mcore.logprobs import chunked_logprobs, reference_logprobs
from megatron_spell.mcore.loss import low_var_kl, policy_loss, token_weights


def _with_kl(cfg: TrainConfig, kl_coef: float) -> TrainConfig:
    """`cfg` with a KL coefficient the config refuses today (no reference model is kept): the loss
    keeps the term for when one is added, and this checks its math."""
    object.__setattr__(cfg, "kl_coef", kl_coef)
    return cfg


def _spec_token_loss(lp, old, a, cfg):
    """Scalar transcription of docs/spell-algorithm.md §5."""
    rho = math.exp(max(-20.0, min(20.0, lp - old)))
    loss = max(-a * rho, -a * min(max(rho, 1 - cfg.clip_ratio_low), 1 + cfg.clip_ratio_high))
    if a < 0:
        loss = min(loss, -a * cfg.clip_ratio_c)
    return loss


def test_policy_loss_matches_spec_formula():
    g = torch.Generator().manual_seed(0)
    n = 200
    lp = -torch.rand(n, generator=g) * 3
    old = lp + torch.randn(n, generator=g) * 1.5  # wide ratios: both clips and the dual clip fire
    adv = torch.randn(n, generator=g) * 2
    cfg = TrainConfig()
    w = torch.full((n,), 1.0 / n)
    loss, m = policy_loss(lp, old, adv, w, cfg)
    ref = (
        sum(_spec_token_loss(lp[i].item(), old[i].item(), adv[i].item(), cfg) for i in range(n)) / n
    )
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert 0 < m["clip_frac"].item() < 1
    assert m["dual_clip_frac"].item() > 0
    assert m["ppo_kl"].item() == pytest.approx((old - lp).mean().item(), rel=1e-5)


def test_kl_and_entropy_terms():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    ent = torch.tensor([1.0, 2.0, 3.0])
    w = torch.full((3,), 1 / 3)
    cfg = _with_kl(TrainConfig(entropy_coef=0.01), 0.1)
    base, _ = policy_loss(lp, lp, torch.ones(3), w, TrainConfig())
    loss, m = policy_loss(lp, lp, torch.ones(3), w, cfg, entropy=ent, ref_logprobs=ref)
    k3 = [(math.exp(r - x) - (r - x) - 1) for x, r in zip(lp.tolist(), ref.tolist())]
    expect = base.item() + 0.1 * sum(k3) / 3 - 0.01 * 2.0
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert low_var_kl(torch.tensor([0.0]), torch.tensor([30.0])).item() == 10.0


def test_token_weights_modes():
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    seq_n = torch.tensor([2.0, 2.0, 2.0, 1.0])
    tw = token_weights(
        mask, seq_n, mode="token_mean", global_num_loss_tokens=3, global_num_sequences=2
    )
    assert tw.tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])
    sw = token_weights(
        mask, seq_n, mode="seq_mean", global_num_loss_tokens=3, global_num_sequences=2
    )
    assert sw.tolist() == pytest.approx([0.25, 0.25, 0, 0.5])
    with pytest.raises(ValueError, match="loss_agg_mode"):
        TrainConfig(loss_agg_mode="micro_mean")


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (0.7, 16), (0.7, 1000)])
def test_chunked_logprobs_match_log_softmax_and_grads(temperature, chunk):
    g = torch.Generator().manual_seed(1)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    lp, ent = chunked_logprobs(hidden, weight, labels, temperature=temperature, chunk_size=chunk)
    lp_ref, ent_ref = reference_logprobs(hidden @ weight.t(), labels, temperature)
    torch.testing.assert_close(lp.double(), lp_ref.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref.double(), rtol=1e-5, atol=1e-5)
    # gradients of an arbitrary combination of both outputs
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (gh, gw) = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (hidden, weight))
    (rh, rw) = torch.autograd.grad(
        (lp_ref.float() * gl).sum() + (ent_ref.float() * ge).sum(), (hidden, weight)
    )
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_gradcheck():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (5,), generator=g)

    def f(hh, ww):
        lp, ent = chunked_logprobs(hh, ww, labels, temperature=0.7, chunk_size=2)
        return lp.double() + 0.3 * ent.double()

    # internal math is fp32, so use a loose tolerance
    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-3, atol=1e-3, rtol=1e-3)


def _largest_tensor_bytes(n: int, chunk: int, vocab: int = 4096, hidden: int = 64) -> int:
    """Bytes of the largest tensor any op creates during the logprob forward + backward (deterministic)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel() * t.element_size())
            return out

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    with Largest():
        lp, ent = chunked_logprobs(h, w, labels, temperature=0.7, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    return Largest.largest


def test_chunked_logprob_largest_tensor_does_not_grow_with_length():
    """No [tokens, vocab] tensor for the whole sequence: 8x the tokens, same largest tensor.

    The memory bound of the chunked pass, measured deterministically (peak RSS carries hundreds of MB of
    allocator noise, more than a full-logits regression adds at test sizes)."""
    small, big = _largest_tensor_bytes(1024, 256), _largest_tensor_bytes(8192, 256)
    full = _largest_tensor_bytes(8192, 8192)  # one chunk: the full fp32 logits exist
    assert full >= 8192 * 4096 * 4
    assert big == small <= 256 * 4096 * 4 * 2  # a chunk's [chunk, V] block (fp32; x2 for a pair)
    assert big < full / 8


def test_padded_vocab_rows_are_excluded():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=g)
    weight = torch.randn(12, 8, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    lp, ent = chunked_logprobs(hidden, weight, labels, temperature=0.7, chunk_size=4, vocab_size=10)
    ref_lp, ref_ent = reference_logprobs(hidden @ weight[:10].t(), labels, 0.7)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)


def test_kl_types_and_config_mapping():
    from megatron_spell.mcore.loss import kl_penalty

    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_penalty(lp, ref, "kl").tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(lp, ref, "mse").tolist() == pytest.approx([0.125, 0.5])
    with pytest.raises(ValueError, match="train.kl_coef=0.1: a KL penalty needs a reference model"):
        TrainConfig(kl_coef=0.1)


def test_loss_table_matches_the_config_choices():
    """`train.loss` selects from POLICY_LOSSES: every name the config accepts has a function."""
    import typing

    from megatron_spell.mcore.loss import POLICY_LOSSES, grpo_loss

    choices = typing.get_args(typing.get_type_hints(TrainConfig)["loss"])
    assert set(choices) == set(POLICY_LOSSES) and POLICY_LOSSES["grpo"] is grpo_loss
    with pytest.raises(ValueError, match="train.loss='gspo': must be one of"):
        TrainConfig(loss="gspo")


def test_loss_dispatches_by_name(monkeypatch):
    """A new entry in the table is used when the config names it (a stand-in loss here)."""
    from megatron_spell.mcore import loss as loss_module

    def double_pg(logprobs, old_logprobs, advantages, weights, cfg):
        return 2.0 * -advantages * (logprobs - old_logprobs).exp(), {}

    monkeypatch.setitem(loss_module.POLICY_LOSSES, "grpo", double_pg)
    lp, adv, w = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5])
    loss, metrics = policy_loss(lp, lp, adv, w, TrainConfig())
    assert loss.item() == pytest.approx(0.0) and metrics == {}
    loss, _ = policy_loss(lp, lp, torch.ones(2), w, TrainConfig())
    assert loss.item() == pytest.approx(-2.0)
