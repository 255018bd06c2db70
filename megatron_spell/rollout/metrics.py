"""The cost of one weight update into the rollout engine (no vLLM import).

`rollout/weights.load_weights` returns a `WeightSyncStats`; the training loop logs it as `sync/seconds`,
`sync/bytes` and `sync/gb_per_s`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightSyncStats:
    """One weight update: wall seconds, bytes moved into the engine, number of tensors."""

    seconds: float
    num_bytes: int
    num_tensors: int

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0
