"""Policy losses by name (`train.loss` -> `POLICY_LOSSES`), plus KL and entropy terms.

See docs/spell-algorithm.md §5. "grpo", per response token (verl `core_algos.compute_policy_loss`,
vanilla mode):

    ratio = exp(clamp(logp - old_logp, -20, 20))
    L     = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
    L     = min(L, -A * clip_ratio_c)            if A < 0   (dual clip)
    L    += kl_coef * clamp(exp(ref - logp) - (ref - logp) - 1, -10, 10)   (low_var_kl / k3;
            also "kl" = logp - ref and "mse" = (logp - ref)^2 / 2, as verl)
    L    -= entropy_coef * entropy

The KL term is kept for a reference model; today the config requires `train.kl_coef = 0`.

Aggregation (deliberate deviation, D9): the reference takes a token mean inside each
micro-batch and weights micro-batches by `len(micro) / normalised_mini_batch_size`, which is neither a token
mean nor a sequence mean of the global batch and depends on how dynamic batching happened to cut the batch
(total weight ~1.3). Here every token carries a weight fixed by the *global* batch before packing:

- `token_mean` (default): weight = 1 / (response tokens of the whole global batch, all DP ranks);
- `seq_mean`: weight = 1 / (response tokens of its sequence * sequences in the global batch).

Summing `weight * L` over the local tokens of every micro-batch on every DP and CP rank gives exactly the
global mean, so the loss and its gradient are invariant to the micro-batch cut, DP, CP, TP and PP. Gradients
are therefore *summed* (not averaged) across DP x CP by the train step.

Metrics are returned as weighted sums with the same weights, so summing them over micro-batches and ranks
gives global means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_spell.config import TrainConfig

LOSS_AGG_MODES = ("token_mean", "seq_mean")
KL_LOSS_TYPES = ("low_var_kl", "kl", "mse")

# (logprobs, old_logprobs, advantages, weights, train) -> (per-token loss, weighted-sum metrics)
PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TrainConfig],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]


def token_weights(
    loss_mask: torch.Tensor,
    seq_num_loss_tokens: torch.Tensor,
    *,
    mode: str,
    global_num_loss_tokens: int,
    global_num_sequences: int,
) -> torch.Tensor:
    """Per-token weights whose sum over all response tokens of the global batch is 1."""
    if mode == "token_mean":
        return loss_mask / max(global_num_loss_tokens, 1)
    if mode == "seq_mean":
        return loss_mask / (seq_num_loss_tokens.clamp(min=1) * max(global_num_sequences, 1))
    raise ValueError(f"train.loss_agg_mode={mode!r} is not one of {LOSS_AGG_MODES}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate to the reference (verl `kl_penalty`): k1 "kl", k2 "mse", k3 "low_var_kl"."""
    if kind == "low_var_kl":
        return low_var_kl(logprobs, ref_logprobs)
    if kind == "kl":
        return logprobs - ref_logprobs
    if kind == "mse":
        return 0.5 * (logprobs - ref_logprobs).square()
    raise ValueError(f"train.kl_loss_type={kind!r} is not one of {KL_LOSS_TYPES}")


def low_var_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref), clamped to [-10, 10] (verl `kl_penalty`, low_var_kl)."""
    kl = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (kl.exp() - kl - 1.0).clamp(-10.0, 10.0)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clip with dual clip per token (verl `compute_policy_loss`, vanilla), the loss of GRPO."""
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    clipped = torch.maximum(pg1, pg2)
    dual = torch.minimum(clipped, -advantages * cfg.clip_ratio_c)
    pg = torch.where(advantages < 0, dual, clipped)
    metrics: dict[str, torch.Tensor] = {
        "pg_loss": (weights * pg).sum().detach(),
        "clip_frac": (weights * (pg2 > pg1).float()).sum().detach(),
        "dual_clip_frac": (
            weights * ((advantages < 0) & (clipped > -advantages * cfg.clip_ratio_c)).float()
        )
        .sum()
        .detach(),
        "ppo_kl": (weights * -log_ratio).sum().detach(),
    }
    return pg, metrics


# train.loss -> policy-gradient loss. A new loss (GSPO, Dr.GRPO, ...) is one function of this
# signature, one entry here and its name in TrainConfig.loss's Literal (a test checks they agree).
POLICY_LOSSES: dict[str, PolicyLossFn] = {"grpo": grpo_loss}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    cfg: TrainConfig,
    *,
    entropy: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the per-token loss `train.loss`, plus KL and entropy terms; inputs are 1-D.

    `weights` is zero on non-response tokens (see `token_weights`). `rollout_weights` (the rollout
    correction's detached factor, mcore/rollout_correction.py) multiplies the policy-gradient term
    only, as verl's `compute_policy_loss_vanilla` does; a token it zeroes still counts in `weights`
    (the token-mean denominator). Returns (loss, metrics) where each metric is a weighted sum (a 0-d
    tensor, detached): the loss's own (grpo: `pg_loss`, after the correction, `clip_frac`,
    `dual_clip_frac`, `ppo_kl`), `entropy`, `kl`.
    """
    per_token, metrics = POLICY_LOSSES[cfg.loss](logprobs, old_logprobs, advantages, weights, cfg)
    if rollout_weights is not None:
        per_token = per_token * rollout_weights.detach()
        metrics["pg_loss"] = (weights * per_token).sum().detach()
    if ref_logprobs is not None and cfg.kl_coef != 0.0:
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_loss_type)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = (weights * kl).sum().detach()
    if entropy is not None:
        metrics["entropy"] = (weights * entropy).sum().detach()
        if cfg.entropy_coef != 0.0:
            per_token = per_token - cfg.entropy_coef * entropy
    loss = (weights * per_token).sum()
    return loss, metrics
