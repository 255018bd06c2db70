"""Role-level generation over one rollout engine, and the engine's phase transitions
(docs/architecture.md "Process model").

Every rollout TP group hosts an independent vLLM engine (vLLM's "external data parallel",
rollout/engine.py): a rank's engine calls never wait for another group's, so a rank with nothing to
generate (every prompt over `rollout.max_prompt_length`, or no questions left) simply makes no call.

* `generate(role, tasks, prompts, n)`: an unconstrained role makes one engine call. A role named in
  `rollout.structured_outputs` makes one constrained call per task that has prompts, in `Task` order
  (the verifier: one call, its format is the same for every task). No prompts: no call.
* `load_weights(buckets)`: the in-place weight load; returns the loop's sync metrics (`sync/*`).
* `sleep()` / `wake_up(tags)`: the engine releases its memory while Megatron trains and takes it
  back in stages (`rollout.sleep_level`); no-ops on CPU, see `RolloutEngine.sleep`.

No vLLM import: the engine (`rollout.engine.RolloutEngine`, or a fake in tests) is injected.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any, Protocol

from megatron_spell.spell.schemas import output_constraint
from megatron_spell.types import Completion, OutputConstraint, Role, Task


class SyncStats(Protocol):
    """What one weight load reports (`rollout.metrics.WeightSyncStats`)."""

    seconds: float
    num_bytes: int

    @property
    def gb_per_s(self) -> float: ...


class TokenEngine(Protocol):
    """The engine under the wrapper: generation on token ids, the in-place weight load and the
    memory release of the colocated step. An excluded (over-long) prompt yields an empty list."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        *,
        max_tokens: int | None = None,
        constraint: OutputConstraint | None = None,
    ) -> list[list[Completion]]: ...

    def load_weights(self, weights: Iterator[list[tuple[str, Any]]]) -> SyncStats: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None: ...


class RoleEngine:
    """Role-level generation and the phase transitions of one engine; see the module docstring."""

    def __init__(
        self, engine: TokenEngine, *, structured: Collection[str] = (), sleep_level: int = 2
    ) -> None:
        """`structured`: the roles constrained to the formats of docs/spell-algorithm.md §2.3
        (rollout.structured_outputs); `sleep_level`: vLLM's sleep level while Megatron trains
        (rollout.sleep_level: 1 keeps a host copy of the weights, 2 drops them, 0 stays resident).
        """
        self.engine = engine
        self.structured = frozenset(Role(r) for r in structured)
        self.sleep_level = sleep_level

    def generate(
        self,
        role: Role,
        tasks: Sequence[Task],
        prompts: Sequence[Sequence[int]],
        n: int,
        *,
        max_tokens: int | None = None,
    ) -> list[list[Completion]]:
        """Completions of `prompts` (prompt i asks a `tasks[i]` question) for `role`, n per prompt."""
        if len(tasks) != len(prompts):
            raise ValueError(
                f"generate {role.value}: {len(tasks)} tasks for {len(prompts)} prompts"
            )
        if role not in self.structured:
            return self._call(prompts, n, max_tokens, None)
        if role is Role.VERIFIER:
            return self._call(prompts, n, max_tokens, output_constraint(role))
        outputs: list[list[Completion]] = [[] for _ in prompts]
        for task in Task:
            idx = [i for i, t in enumerate(tasks) if t is task]
            outs = self._call(
                [prompts[i] for i in idx], n, max_tokens, output_constraint(role, task)
            )
            for i, o in zip(idx, outs, strict=True):
                outputs[i] = o
        return outputs

    def _call(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_tokens: int | None,
        constraint: OutputConstraint | None,
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        return self.engine.generate(prompts, n, max_tokens=max_tokens, constraint=constraint)

    def load_weights(self, weights: Iterator[list[tuple[str, Any]]]) -> dict[str, float]:
        """Load the policy's weight buckets into the engine in place; the sync metrics."""
        stats = self.engine.load_weights(weights)
        return {
            "seconds": stats.seconds,
            "bytes": float(stats.num_bytes),
            "gb_per_s": stats.gb_per_s,
        }

    def sleep(self) -> None:
        """Release the KV cache (and, at level 2, the weights) before the update; level 0: stay."""
        if self.sleep_level:
            self.engine.sleep(level=self.sleep_level)

    def wake_up(self, tags: Sequence[str]) -> None:
        """Take back what `sleep` released: "weights" before the sync, "kv_cache" after it."""
        if self.sleep_level:
            self.engine.wake_up(tags)
