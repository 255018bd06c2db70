"""Rollout correction: importance weights pi_train / pi_rollout between the training forward and the
rollout engine, truncated, masked and vetoed (docs/spell-algorithm.md §5, "Rollout correction").

vLLM samples with its own kernels (bf16, its own MoE router), Megatron trains with others; the gap
grows with length and with MoE. With lr_t = logp_train(t) - logp_rollout(t) on the response tokens t
of a sequence s of n_s response tokens, a *level* gives each token a ratio:

    "token"      r_t = exp(lr_t)
    "sequence"   r_t = exp(sum_{u in s} lr_u)         the sequence's ratio (verl's Seq-IS)
    "geometric"  r_t = exp(sum_{u in s} lr_u / n_s)   its geometric mean (verl's Geo-RS)

(exponents clamped to [-20, 20]), and the per-token factor that multiplies the policy-gradient loss
is c_t = w_t * k_t * v_s, each 1 when its setting is off:

    w_t = clamp(r_t, low, high)   TIS: level `train.rollout_is`, band `rollout_is_threshold`
    k_t = [lo <= r_t <= hi]       MIS: level `train.rollout_rs`, band `rollout_rs_threshold`
    v_s = [no u in s with exp(lr_u) < veto]     veto: `train.rollout_token_veto_threshold`

IcePop's two-sided mask is `rollout_is=token` with `rollout_rs=token` and band [0.5, 5.0]. Bounds
are compared in log space (lr against log(bound)), so a ratio is never rounded across a bound.

Follows verl's rollout correction: `verl/trainer/ppo/rollout_corr_helper.py` (volcengine/verl at
418f964ab: `compute_rollout_correction_weights` for the IS levels and truncation,
`compute_rollout_rejection_mask` for the token / sequence / geometric masks and the 1/upper default
lower bound, the per-token veto in `compute_rollout_correction_and_rejection_mask`), and its loss
`verl/trainer/ppo/core_algos.py` `compute_policy_loss_vanilla`, where the detached weights
multiply the per-token PPO loss. Additions: a lower truncation bound for TIS (NVIDIA-NeMo/RL#2886).

Pure torch, no torch.distributed: a sequence's tokens can be split across context-parallel ranks, so
the sequence-level sums are all-reduced by the caller's `all_reduce_sum` (the CP group's sum), with
each token carrying its sequence's full response length n_s (as the token-mean weights do,
mcore/loss.py), so every CP rank gets the same per-sequence values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LEVELS = ("token", "sequence", "geometric")
SAFETY_BOUND = 20.0  # exp(+-20) bounds every ratio (verl's SAFETY_BOUND)
# per-group sums returned by `correction_sums`, in this order; `weight_max` is reduced by max
SUM_KEYS = ("tokens", "weight", "truncated", "masked", "vetoed")


@dataclass(frozen=True)
class CorrectionSpec:
    """Resolved settings (see `from_train`); a bound of None is no bound."""

    is_level: str | None = None
    is_low: float | None = None
    is_high: float | None = None
    rs_level: str | None = None
    rs_low: float | None = None
    rs_high: float | None = None
    veto: float | None = None

    def __post_init__(self) -> None:
        for name in ("is_level", "rs_level"):
            value = getattr(self, name)
            if value is not None and value not in LEVELS:
                raise ValueError(f"CorrectionSpec.{name}={value!r}: use one of {LEVELS} or None")

    @property
    def needs_sequences(self) -> bool:
        """True when a sequence-level sum is needed (a sequence level, or the veto)."""
        return self.veto is not None or any(
            lv in ("sequence", "geometric") for lv in (self.is_level, self.rs_level)
        )

    @classmethod
    def from_train(cls, train) -> CorrectionSpec | None:
        """The settings of a `TrainConfig`, or None when the correction is off (the default)."""
        if not train.rollout_correction_on:
            return None
        is_low = is_high = rs_low = rs_high = None
        if train.rollout_is is not None:
            is_low, is_high = train.rollout_is_band
        if train.rollout_rs is not None:
            rs_low, rs_high = train.rollout_rs_band
        return cls(
            is_level=train.rollout_is,
            is_low=is_low,
            is_high=is_high,
            rs_level=train.rollout_rs,
            rs_low=rs_low,
            rs_high=rs_high,
            veto=train.rollout_token_veto_threshold,
        )


@dataclass(frozen=True)
class Correction:
    """Per-token results of `rollout_correction` (all detached, [n])."""

    factor: torch.Tensor  # c_t, multiplies the per-token policy-gradient loss
    truncated: torch.Tensor  # bool: the IS ratio lay outside its band and was clamped
    masked: torch.Tensor  # bool: c_t = 0 by the mask or the veto
    vetoed: torch.Tensor  # bool: the token's sequence was vetoed


def _log_ratio_at(
    level: str, lr: torch.Tensor, seq_sum: torch.Tensor | None, seq_len: torch.Tensor | None
) -> torch.Tensor:
    """log r_t at `level` (unclamped)."""
    if level == "token":
        return lr
    assert seq_sum is not None and seq_len is not None
    if level == "sequence":
        return seq_sum
    return seq_sum / seq_len.clamp(min=1)


def _log(bound: float | None, default: float) -> float:
    return default if bound is None else math.log(bound)


def rollout_correction(
    log_ratio: torch.Tensor,
    spec: CorrectionSpec,
    *,
    seq_index: torch.Tensor | None = None,
    seq_len: torch.Tensor | None = None,
    num_seqs: int = 0,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Correction:
    """The correction of one rank's response tokens (see the module docstring).

    log_ratio: [n] logp_train - logp_rollout. For a sequence level or the veto also: seq_index [n],
    each token's sequence in [0, num_seqs) (the same numbering on every CP rank), and seq_len [n],
    the response tokens of that whole sequence; `all_reduce_sum` sums a [num_seqs, k] tensor over
    the ranks that share the sequences (None: this rank holds whole sequences). Every such rank
    must call it, so it is called whenever `spec.needs_sequences`, whatever this rank's share.
    """
    lr = log_ratio.detach().float()
    seq_sum = seq_len_f = None
    vetoed = torch.zeros_like(lr, dtype=torch.bool)
    if spec.needs_sequences:
        if seq_index is None or seq_len is None:
            raise ValueError(
                "rollout_correction: sequence levels and the veto need seq_index, seq_len"
            )
        per_seq = torch.zeros(num_seqs, 2, dtype=torch.float64, device=lr.device)
        per_seq[:, 0].index_add_(0, seq_index, lr.double())
        if spec.veto is not None:
            below = (lr < math.log(spec.veto)).double()
            per_seq[:, 1].index_add_(0, seq_index, below)
        if all_reduce_sum is not None:
            per_seq = all_reduce_sum(per_seq)
        seq_sum = per_seq[seq_index, 0].float()
        seq_len_f = seq_len.float()
        if spec.veto is not None:
            vetoed = per_seq[seq_index, 1] > 0
    weight = torch.ones_like(lr)
    truncated = torch.zeros_like(lr, dtype=torch.bool)
    if spec.is_level is not None:
        log_r = _log_ratio_at(spec.is_level, lr, seq_sum, seq_len_f)
        lo, hi = _log(spec.is_low, -math.inf), _log(spec.is_high, math.inf)
        truncated = (log_r < lo) | (log_r > hi)
        weight = log_r.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
        if spec.is_low is not None:
            weight = torch.where(log_r < lo, torch.full_like(weight, spec.is_low), weight)
        if spec.is_high is not None:
            weight = torch.where(log_r > hi, torch.full_like(weight, spec.is_high), weight)
    keep = ~vetoed
    if spec.rs_level is not None:
        log_r = _log_ratio_at(spec.rs_level, lr, seq_sum, seq_len_f)
        lo, hi = _log(spec.rs_low, -math.inf), _log(spec.rs_high, math.inf)
        keep = keep & (log_r >= lo) & (log_r <= hi)
    factor = torch.where(keep, weight, torch.zeros_like(weight))
    return Correction(factor=factor, truncated=truncated, masked=~keep, vetoed=vetoed)


def correction_sums(
    corr: Correction, group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group metric sums [num_groups, len(SUM_KEYS)] (float64) and maxima of the factor
    [num_groups] (0 for a group without tokens); `group` [n] is each token's group index.

    Sums add up over micro-batches and ranks (every token is held by one CP rank), so
    mean = weight / tokens and the fractions = truncated / tokens, ... of the whole batch.
    """
    cols = torch.stack(
        [
            torch.ones_like(corr.factor),
            corr.factor,
            corr.truncated.float(),
            corr.masked.float(),
            corr.vetoed.float(),
        ],
        dim=1,
    ).double()
    sums = torch.zeros(num_groups, len(SUM_KEYS), dtype=torch.float64, device=cols.device)
    sums.index_add_(0, group, cols)
    top = torch.zeros(num_groups, dtype=torch.float64, device=cols.device)
    top.scatter_reduce_(0, group, corr.factor.double(), reduce="amax", include_self=True)
    return sums, top


def correction_metrics(sums: torch.Tensor, top: torch.Tensor, names: list[str]) -> dict[str, float]:
    """`rollout_corr/<metric>` of all groups together and `rollout_corr/<name>/<metric>` of each
    named group (a group named "" only counts in the total), from globally reduced sums, maxima."""
    out: dict[str, float] = {}

    def put(prefix: str, s: torch.Tensor, m: float) -> None:
        n = float(s[0])
        if n == 0:
            return
        out[f"{prefix}/weight_mean"] = float(s[1]) / n
        out[f"{prefix}/weight_max"] = m
        out[f"{prefix}/truncated_frac"] = float(s[2]) / n
        out[f"{prefix}/masked_frac"] = float(s[3]) / n
        out[f"{prefix}/vetoed_frac"] = float(s[4]) / n

    put("rollout_corr", sums.sum(0), float(top.max()) if top.numel() else 0.0)
    for i, name in enumerate(names):
        if name:
            put(f"rollout_corr/{name}", sums[i], float(top[i]))
    return out
