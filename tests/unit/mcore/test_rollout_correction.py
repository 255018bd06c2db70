"""Rollout correction against hand-computed values, for every level and mode (docs/spell-algorithm.md
§5, mcore/rollout_correction.py), its entry into the loss, the CP contract and the config.

Two sequences, ratios pi_train / pi_rollout per token:
    sequence 0: 2, 0.5, 4    product 4,    geometric mean 4 ** (1/3) = 1.587
    sequence 1: 0.25, 1      product 0.25, geometric mean 0.5
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_spell.config import TrainConfig, load_config
from megatron_spell.mcore.loss import policy_loss
from megatron_spell.mcore.rollout_correction import (
    CorrectionSpec,
    correction_metrics,
    correction_sums,
    rollout_correction,
)

ROOT = Path(__file__).resolve().parents[3]
RATIOS = [2.0, 0.5, 4.0, 0.25, 1.0]
LR = torch.tensor([math.log(r) for r in RATIOS])
SEQ = torch.tensor([0, 0, 0, 1, 1])
LEN = torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0])
G0 = 4.0 ** (1 / 3)


def run(spec: CorrectionSpec, lr: torch.Tensor = LR):
    return rollout_correction(lr, spec, seq_index=SEQ, seq_len=LEN, num_seqs=2)


def close(t: torch.Tensor, expect: list[float]) -> bool:
    return torch.allclose(t, torch.tensor(expect, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def flags(t: torch.Tensor) -> list[bool]:
    return [bool(x) for x in t]


F, T = False, True


# --- importance weights and truncation (TIS) ----------------------------------------------------


@pytest.mark.parametrize(
    "spec, weight, truncated",
    [
        # token, an upper bound: 4 -> 3
        (CorrectionSpec(is_level="token", is_high=3.0), [2, 0.5, 3, 0.25, 1], [F, F, T, F, F]),
        # token, [0.4, 3]: 0.25 -> 0.4 as well (the lower bound)
        (
            CorrectionSpec(is_level="token", is_low=0.4, is_high=3.0),
            [2, 0.5, 3, 0.4, 1],
            [F, F, T, T, F],
        ),
        # sequence (product): 4 -> 3 on all of sequence 0, 0.25 kept
        (
            CorrectionSpec(is_level="sequence", is_high=3.0),
            [3, 3, 3, 0.25, 0.25],
            [T, T, T, F, F],
        ),
        # geometric mean, [0.6, 5]: 1.587 kept, 0.5 -> 0.6
        (
            CorrectionSpec(is_level="geometric", is_low=0.6, is_high=5.0),
            [G0, G0, G0, 0.6, 0.6],
            [F, F, F, T, T],
        ),
    ],
    ids=["token_upper", "token_band", "sequence_upper", "geometric_band"],
)
def test_importance_weights_and_truncation(spec, weight, truncated):
    c = run(spec)
    assert close(c.factor, weight), c.factor
    assert flags(c.truncated) == truncated
    assert not c.masked.any() and not c.vetoed.any()


# --- masks (MIS, IcePop) and the veto -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, factor, masked",
    [
        # token mask [0.5, 3]: 4 and 0.25 dropped; the bound itself (0.5) is inside
        (
            CorrectionSpec(rs_level="token", rs_low=0.5, rs_high=3.0),
            [1, 1, 0, 0, 1],
            [F, F, T, T, F],
        ),
        # IcePop: token weights, masked outside [0.5, 3] (not truncated)
        (
            CorrectionSpec(
                is_level="token", is_high=5.0, rs_level="token", rs_low=0.5, rs_high=3.0
            ),
            [2, 0.5, 0, 0, 1],
            [F, F, T, T, F],
        ),
        # sequence (product) mask [0.3, 5]: sequence 1 (0.25) dropped whole
        (
            CorrectionSpec(rs_level="sequence", rs_low=0.3, rs_high=5.0),
            [1, 1, 1, 0, 0],
            [F, F, F, T, T],
        ),
        # geometric mask [0.55, 1.5]: both dropped (1.587 > 1.5, 0.5 < 0.55)
        (
            CorrectionSpec(rs_level="geometric", rs_low=0.55, rs_high=1.5),
            [0, 0, 0, 0, 0],
            [T, T, T, T, T],
        ),
        # geometric mask [0.4, 2]: both kept, with geometric weights
        (
            CorrectionSpec(
                is_level="geometric", is_high=2.0, rs_level="geometric", rs_low=0.4, rs_high=2
            ),
            [G0, G0, G0, 0.5, 0.5],
            [F, F, F, F, F],
        ),
    ],
    ids=["token_mask", "icepop", "sequence_mask", "geometric_mask_both", "geometric_keep"],
)
def test_masks(spec, factor, masked):
    c = run(spec)
    assert close(c.factor, factor), c.factor
    assert flags(c.masked) == masked
    assert not c.vetoed.any()


def test_veto_drops_the_whole_sequence_of_a_catastrophic_token():
    # 0.25 < 0.3 vetoes sequence 1 (both of its tokens, also the one at ratio 1)
    c = run(CorrectionSpec(is_level="token", is_high=3.0, veto=0.3))
    assert close(c.factor, [2, 0.5, 3, 0, 0])
    assert flags(c.vetoed) == [F, F, F, T, T] and flags(c.masked) == [F, F, F, T, T]
    # below every ratio: nothing vetoed
    assert not run(CorrectionSpec(veto=0.2)).vetoed.any()
    # strictly below: a token exactly at the threshold is not vetoed
    assert not run(CorrectionSpec(veto=0.25)).vetoed.any()


def test_ratios_are_bounded_by_exp_20():
    lr = torch.tensor([30.0, 0.0, 0.0, -30.0, 0.0])
    c = run(CorrectionSpec(is_level="token"), lr)
    assert close(c.factor, [math.exp(20), 1, 1, math.exp(-20), 1])
    assert torch.isfinite(run(CorrectionSpec(is_level="sequence"), lr * 10).factor).all()


def test_sequence_levels_need_the_sequence_of_each_token():
    rollout_correction(LR, CorrectionSpec(is_level="token"))  # token level: no sequence needed
    with pytest.raises(ValueError, match="need seq_index"):
        rollout_correction(LR, CorrectionSpec(is_level="geometric"))


# --- context parallelism: a sequence's tokens on two ranks -------------------------------------


def test_cp_split_sums_sequences_across_ranks():
    """Each 'rank' holds part of every sequence; `all_reduce_sum` adds the other rank's per-sequence
    partial sums (hand-computed here), so both get the unsplit result."""
    spec = CorrectionSpec(is_level="geometric", rs_level="sequence", rs_low=0.3, veto=0.3)
    whole = run(spec)
    ranks = [[0, 3], [1, 2, 4]]
    for mine, other in (ranks, ranks[::-1]):
        o = torch.tensor(other)
        theirs = torch.zeros(2, 2, dtype=torch.float64)
        theirs[:, 0].index_add_(0, SEQ[o], LR[o].double())
        theirs[:, 1].index_add_(0, SEQ[o], (LR[o] < math.log(0.3)).double())
        m = torch.tensor(mine)
        got = rollout_correction(
            LR[m],
            spec,
            seq_index=SEQ[m],
            seq_len=LEN[m],
            num_seqs=2,
            all_reduce_sum=lambda t, theirs=theirs: t + theirs,
        )
        assert torch.allclose(got.factor, whole.factor[m]) and torch.equal(
            got.masked, whole.masked[m]
        )
    # without the reduction the halves disagree with the whole sequence
    m = torch.tensor(ranks[0])
    alone = rollout_correction(LR[m], spec, seq_index=SEQ[m], seq_len=LEN[m], num_seqs=2)
    assert not torch.allclose(alone.factor, whole.factor[m])


# --- into the loss -----------------------------------------------------------------------------


def test_masked_sequence_contributes_nothing_and_still_counts_in_the_token_mean():
    """On-policy (old = current), the GRPO per-token loss is -A; the factor multiplies it and the
    token-mean denominator stays all 5 response tokens (verl's bypass-mode and IcePop behaviour)."""
    spec = CorrectionSpec(is_level="token", is_high=3.0, veto=0.3)  # factor [2, 0.5, 3, 0, 0]
    lp = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0])
    w = torch.full((5,), 1 / 5)
    factor = run(spec).factor
    loss, m = policy_loss(lp, lp.detach(), adv, w, TrainConfig(), rollout_weights=factor)
    assert loss.item() == pytest.approx(-(2 + 0.5 + 3) / 5, rel=1e-6)
    assert m["pg_loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert lp.grad[3:].abs().max() == 0  # the vetoed sequence: no gradient at all
    assert lp.grad[:3].abs().min() > 0
    # changing the vetoed sequence's advantages changes nothing
    other = adv.clone()
    other[3:] = 100.0
    again, _ = policy_loss(lp, lp.detach(), other, w, TrainConfig(), rollout_weights=factor)
    assert again.item() == loss.item()
    # the weights are detached: a factor that requires grad adds no gradient of its own
    f = factor.clone().requires_grad_(True)
    l2, _ = policy_loss(lp.detach(), lp.detach(), adv, w, TrainConfig(), rollout_weights=f)
    assert not l2.requires_grad


def test_entropy_term_is_not_weighted():
    lp = torch.tensor([-1.0, -2.0])
    ent = torch.tensor([1.0, 3.0])
    w = torch.full((2,), 0.5)
    cfg = TrainConfig(entropy_coef=0.1)
    zero = torch.zeros(2)
    loss, m = policy_loss(lp, lp, torch.ones(2), w, cfg, entropy=ent, rollout_weights=zero)
    assert loss.item() == pytest.approx(-0.1 * 2.0) and m["entropy"].item() == pytest.approx(2.0)


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_per_role_and_total():
    c = run(CorrectionSpec(is_level="token", is_high=3.0, veto=0.3))  # [2, 0.5, 3, 0, 0]
    group = torch.tensor([0, 0, 0, 1, 1])
    sums, top = correction_sums(c, group, 3)  # group 2 ("verifier") has no token
    got = correction_metrics(sums, top, ["responder", "questioner", "verifier"])
    assert got["rollout_corr/weight_mean"] == pytest.approx(5.5 / 5)
    assert got["rollout_corr/weight_max"] == pytest.approx(3.0)
    assert got["rollout_corr/truncated_frac"] == pytest.approx(1 / 5)
    assert got["rollout_corr/masked_frac"] == pytest.approx(2 / 5)
    assert got["rollout_corr/vetoed_frac"] == pytest.approx(2 / 5)
    assert got["rollout_corr/responder/weight_mean"] == pytest.approx(5.5 / 3)
    assert got["rollout_corr/responder/masked_frac"] == 0.0
    assert got["rollout_corr/questioner/weight_max"] == 0.0
    assert got["rollout_corr/questioner/masked_frac"] == 1.0
    assert not any(k.startswith("rollout_corr/verifier/") for k in got)
    # sums of parts (micro-batches, ranks) give the same metrics as the whole
    a = correction_sums(run(CorrectionSpec(is_level="token", is_high=3.0, veto=0.3)), group, 3)
    assert torch.equal(a[0], sums) and torch.equal(a[1], top)
    # an unnamed group counts in the total only
    unnamed = correction_metrics(sums, top, ["", "questioner", "verifier"])
    assert "rollout_corr/responder/weight_mean" not in unnamed
    assert unnamed["rollout_corr/weight_mean"] == got["rollout_corr/weight_mean"]


# --- config --------------------------------------------------------------------------------------


def test_off_by_default_and_spec_from_config():
    assert CorrectionSpec.from_train(TrainConfig()) is None
    t = TrainConfig(
        rollout_is="geometric",
        rollout_is_threshold=(0.5, 5.0),
        rollout_rs="token",
        rollout_rs_threshold=4.0,
        rollout_token_veto_threshold=1e-4,
    )
    assert CorrectionSpec.from_train(t) == CorrectionSpec(
        is_level="geometric",
        is_low=0.5,
        is_high=5.0,
        rs_level="token",
        rs_low=0.25,
        rs_high=4.0,
        veto=1e-4,
    )
    assert CorrectionSpec.from_train(TrainConfig(rollout_is="token")) == CorrectionSpec(
        is_level="token", is_high=2.0
    )


def test_the_moe_preset_turns_on_token_level_band_and_veto():
    c = load_config(ROOT / "examples/qwen3_30b_a3b/spell_100k.yaml")
    spec = CorrectionSpec.from_train(c.train)
    assert spec == CorrectionSpec(
        is_level="token", is_high=5.0, rs_level="token", rs_low=0.5, rs_high=5.0, veto=1e-4
    )
    dense = load_config(ROOT / "examples/qwen2_5_7b_instruct/spell_16k.yaml")
    assert CorrectionSpec.from_train(dense.train) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.rollout_is=tokens"], "train.rollout_is='tokens': must be null or one of"),
        (["train.rollout_rs=seq"], "train.rollout_rs='seq': must be null or one of"),
        (
            ["train.rollout_is=token", "train.rollout_is_threshold=0.5_5.0"],
            "train.rollout_is_threshold='0.5_5.0': write a band as a list, [low, high]",
        ),
        (
            ["train.rollout_is=token", "train.rollout_is_threshold=[5.0, 0.5]"],
            "train.rollout_is_threshold=[5.0, 0.5]: a band is [low, high] with 0 < low < high",
        ),
        (["train.rollout_is=token", "train.rollout_is_threshold=0"], "must be > 0"),
        (["train.rollout_rs=token"], "set train.rollout_rs_threshold=[low, high]"),
        (
            ["train.rollout_token_veto_threshold=2"],
            "train.rollout_token_veto_threshold=2.0: must be in (0, 1)",
        ),
        (
            ["train.rollout_is=token", "train.recompute_old_logprobs=true"],
            "train.recompute_old_logprobs=True: the rollout correction reads vLLM's log-probs",
        ),
        (
            ["train.rollout_token_veto_threshold=1e-4", "rollout.structured_outputs=[verifier]"],
            "rollout.structured_outputs=['verifier']: vLLM reports the log-probs of the constrained",
        ),
    ],
)
def test_bad_settings_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.hf_dir=/m", *overrides])
    assert message in str(err.value)


def test_band_overrides_parse():
    c = load_config(
        None,
        [
            "model.hf_dir=/m",
            "train.rollout_is=sequence",
            "train.rollout_is_threshold=[0.5, 5]",
            "train.rollout_rs=geometric",
            "train.rollout_rs_threshold=2",
        ],
    )
    assert c.train.rollout_is_band == (0.5, 5.0) and c.train.rollout_rs_band == (0.5, 2.0)
