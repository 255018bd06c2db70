"""Reference comparison of per-token log-probabilities from two sources (vLLM, HF, Megatron)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogprobMismatch:
    """Absolute difference between two sets of log-probabilities of the same sampled tokens."""

    mean_abs: float
    max_abs: float
    num_tokens: int


def logprob_mismatch(
    rollout: Sequence[Sequence[float]] | torch.Tensor,
    recomputed: Sequence[Sequence[float]] | torch.Tensor,
) -> LogprobMismatch:
    """Mean/max |rollout - recomputed| over all tokens of all sequences (same shapes required)."""
    if isinstance(rollout, torch.Tensor) and isinstance(recomputed, torch.Tensor):
        a, b = rollout.double().flatten(), recomputed.double().flatten()
    else:
        if len(rollout) != len(recomputed):
            raise ValueError(
                f"logprob_mismatch: {len(rollout)} rollout sequences vs {len(recomputed)} recomputed"
            )
        for i, (x, y) in enumerate(zip(rollout, recomputed, strict=True)):
            if len(x) != len(y):
                raise ValueError(f"logprob_mismatch: sequence {i} has {len(x)} vs {len(y)} tokens")
        a = torch.tensor([v for seq in rollout for v in seq], dtype=torch.float64)
        b = torch.tensor([float(v) for seq in recomputed for v in seq], dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"logprob_mismatch: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return LogprobMismatch(mean_abs=0.0, max_abs=0.0, num_tokens=0)
    diff = (a - b).abs()
    return LogprobMismatch(
        mean_abs=float(diff.mean()), max_abs=float(diff.max()), num_tokens=int(a.numel())
    )
