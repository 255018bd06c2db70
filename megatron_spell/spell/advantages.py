"""Role-aware GRPO advantages, Eq. 8 and Eq. 9 (docs/spell-algorithm.md §3.6), one scalar per
trajectory.

* Responder and verifier (Eq. 8): z-score within the group of the same uid,
  `A = (r - mean_g) / (std_g + eps)`.
* Questioner (Eq. 9, `questioner_group="batch"`): z-score per task over all questioner samples of that task in
  the final batch (good and sampled bad together). With `questioner_group="none"` the raw mapped reward is the
  advantage.

`std` is the unbiased (N-1) standard deviation, as `torch.std`; eps = 1e-6.

Deliberate decision (D7): a group or task with a single sample has no unbiased std (NaN in
the reference's questioner branch). We use the rule verl already applies to a responder group of size 1: mean 0
and std 1, so the advantage is the raw reward. A lone bad case still gets its negative signal and nothing is NaN.
The token-level broadcast (advantage x response mask) is the loss's job.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

from megatron_spell.types import Role, TrainBatch, Trajectory

EPS = 1e-6
QUESTIONER_GROUPS = ("batch", "none")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased std; a single value gives (0, 1) (module docstring)."""
    n = len(values)
    if n == 1:
        return 0.0, 1.0
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def group_normalize(
    rewards: Sequence[float], keys: Sequence[Hashable], eps: float = EPS
) -> list[float]:
    """`(r - mean_k) / (std_k + eps)` where mean and unbiased std are taken over entries with the same key."""
    if len(rewards) != len(keys):
        raise ValueError(f"got {len(rewards)} rewards but {len(keys)} group keys")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    out = [0.0] * len(rewards)
    for idx in groups.values():
        mean, std = _mean_std([float(rewards[i]) for i in idx])
        for i in idx:
            out[i] = (float(rewards[i]) - mean) / (std + eps)
    return out


def trajectory_advantages(
    trajectories: Sequence[Trajectory], *, questioner_group: str = "batch", eps: float = EPS
) -> list[float]:
    """One advantage per trajectory, in order: per-uid groups for responder/verifier, per-task for questioner."""
    if questioner_group not in QUESTIONER_GROUPS:
        raise ValueError(
            f"questioner_group={questioner_group!r}: expected one of {QUESTIONER_GROUPS}"
        )
    out = [0.0] * len(trajectories)
    for role in Role:
        idx = [i for i, t in enumerate(trajectories) if t.role is role]
        if not idx:
            continue
        rewards = [trajectories[i].reward for i in idx]
        if role is Role.QUESTIONER:
            if questioner_group == "none":
                values = [float(r) for r in rewards]
            else:
                values = group_normalize(rewards, [trajectories[i].task for i in idx], eps)
        else:
            values = group_normalize(rewards, [trajectories[i].uid for i in idx], eps)
        for i, v in zip(idx, values):
            out[i] = v
    return out


def with_advantages(
    batch: TrainBatch, *, questioner_group: str = "batch", eps: float = EPS
) -> TrainBatch:
    """A copy of `batch` whose trajectories carry their advantages."""
    parts = (batch.responder, batch.questioner, batch.verifier)
    flat = [t for part in parts for t in part]
    values = iter(trajectory_advantages(flat, questioner_group=questioner_group, eps=eps))
    new_parts = [tuple(dataclasses.replace(t, advantage=next(values)) for t in p) for p in parts]
    return TrainBatch(responder=new_parts[0], questioner=new_parts[1], verifier=new_parts[2])
