"""Lockstep generation: every rank makes the same sequence of engine `generate` calls.

With several ranks the vLLM engines run data parallel and step in lockstep: each `generate` loops until
every rank's requests are done, so a rank that skips a call (it has nothing to generate) leaves the other
ranks waiting for it forever. `LockstepEngine` is the one place that rule lives:

* `generate(role, tasks, prompts, n)` is role level. An unconstrained role makes one engine call. A role
  named in `rollout.structured_outputs` makes one constrained call per task, in `Task` order, whether or
  not this rank has prompts of that task (the verifier: one call, its format is the same for every task).
* An engine call without prompts still enters the engine on a lockstep rank, as a one-token dummy request.
  On one rank (or one rollout group) the empty call goes through as it is and costs nothing.

The sequence of engine calls therefore depends only on the roles called and the config, never on a rank's
prompts. The weight load (`load_weights`) returns the sync metrics of the loop (`sync/*`).

No vLLM import: the engine (`rollout.engine.RolloutEngine`, or a fake in tests) is injected.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any, Protocol

from megatron_spell.spell.schemas import output_constraint
from megatron_spell.types import Completion, OutputConstraint, Role, Task

# the request a lockstep rank sends when it has nothing to generate (its output is thrown away)
DUMMY_PROMPT: tuple[int, ...] = (0,)


class SyncStats(Protocol):
    """What one weight load reports (`rollout.metrics.WeightSyncStats`)."""

    seconds: float
    num_bytes: int

    @property
    def gb_per_s(self) -> float: ...


class TokenEngine(Protocol):
    """The engine under the wrapper: generation on token ids and the in-place weight load.

    An excluded (over-long) prompt yields an empty list.
    """

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        *,
        max_tokens: int | None = None,
        constraint: OutputConstraint | None = None,
    ) -> list[list[Completion]]: ...

    def load_weights(self, weights: Iterator[list[tuple[str, Any]]]) -> SyncStats: ...


class LockstepEngine:
    """Role-level generation with the same engine calls on every rank; see the module docstring."""

    def __init__(
        self, engine: TokenEngine, *, structured: Collection[str] = (), lockstep: bool
    ) -> None:
        """`structured`: the roles constrained to the formats of docs/spell-algorithm.md §2.3
        (rollout.structured_outputs); `lockstep`: several rollout groups step together (vLLM data
        parallel), so empty calls are dummies.
        """
        self.engine = engine
        self.structured = frozenset(Role(r) for r in structured)
        self.lockstep = lockstep

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
        if not prompts and self.lockstep:
            self.engine.generate([DUMMY_PROMPT], 1, max_tokens=1)
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
