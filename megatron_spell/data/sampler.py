"""Task split of the corpus and the seeded, resumable domain sampler (docs/spell-algorithm.md §2 and
§4.3).

* `assign_tasks`: rows are grouped by their source prefix (text before the first "_" of `data_source`); the rows
  of a prefix that feeds several tasks are shuffled with the given RNG and split into disjoint, near-equal
  parts, one per task in the listed order (the reference splits Ultra-FineWeb in two halves with an unseeded
  shuffle; ours is seeded).
* `DomainSampler.next_round()`: `int(gen_batch_size * w_task)` (task, row) pairs per task, weights normalised
  over the tasks that have rows, the remainder dealt one by one to the highest-weight tasks (ties by name). Each
  task walks its own shuffled row order; when fewer rows remain than it needs, the order is reshuffled and the
  leftovers are discarded. The round's pairs are shuffled together.

Deliberate decisions:

* D12: `state_dict()` / `load_state_dict()` capture the RNG state, every task's order and cursor and
  the round counter as plain JSON-able data, so a resumed run continues the sequence instead of replaying it.
* A task that needs more rows in one round than it has takes them from successive reshuffled passes (the
  reference would repeat the rebuild forever or fail); this only happens with tiny corpora.
* `domain_sampling.update_weights` (a dead option in the reference) does not exist here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_spell.data.corpus import source_prefix
from megatron_spell.types import DocSet, Task


def assign_tasks(
    rows: Sequence[DocSet],
    tasks_by_source: Mapping[str, Sequence[str]],
    rng: random.Random,
) -> dict[Task, list[int]]:
    """Row indices per task (module docstring). A row whose prefix is not configured is a ValueError."""
    by_prefix: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_prefix.setdefault(source_prefix(row.data_source), []).append(i)
    out: dict[Task, list[int]] = {}
    for prefix in sorted(by_prefix):
        if prefix not in tasks_by_source:
            raise ValueError(
                f"data.tasks has no entry for data_source prefix {prefix!r} "
                f"(configured: {sorted(tasks_by_source)}); add data.tasks.{prefix}=[...]"
            )
        tasks = [Task(t) for t in tasks_by_source[prefix]]
        if not tasks:
            continue
        indices = list(by_prefix[prefix])
        rng.shuffle(indices)
        for k, task in enumerate(tasks):
            lo, hi = k * len(indices) // len(tasks), (k + 1) * len(indices) // len(tasks)
            out.setdefault(task, []).extend(indices[lo:hi])
    return out


def round_counts(weights: Mapping[Task, float], total: int) -> dict[Task, int]:
    """Per-task counts of one round: `int(total * w)` plus the remainder round-robin by weight
    (`SPELL/verl/verl/utils/dataset/spell_dataset.py:431-451`)."""
    positive = {t: float(w) for t, w in weights.items() if w > 0}
    if not positive:
        raise ValueError("data.domain_weights: at least one task with rows needs a positive weight")
    norm = sum(positive.values())
    counts = {t: int(total * w / norm) for t, w in positive.items()}
    order = sorted(positive, key=lambda t: (-positive[t], t.value))
    for i in range(total - sum(counts.values())):
        counts[order[i % len(order)]] += 1
    return counts


class DomainSampler:
    """Infinite, seeded sampler of (task, row index) pairs per gen round (module docstring)."""

    def __init__(
        self,
        task_rows: Mapping[Task, Sequence[int]],
        weights: Mapping[str | Task, float],
        gen_batch_size: int,
        seed: int,
    ) -> None:
        if gen_batch_size < 1:
            raise ValueError(f"data.gen_batch_size={gen_batch_size} must be >= 1")
        self._rows = {Task(t): list(r) for t, r in task_rows.items() if r}
        if not self._rows:
            raise ValueError(
                "DomainSampler: no task has any corpus rows (check data.paths/data.tasks)"
            )
        w = {Task(t): float(v) for t, v in weights.items()}
        self.counts = round_counts({t: w.get(t, 0.0) for t in sorted(self._rows)}, gen_batch_size)
        self._rng = random.Random(seed)
        self._order: dict[Task, list[int]] = {}
        self._cursor: dict[Task, int] = {}
        self.num_rounds = 0
        for task in sorted(self._rows):
            self._reshuffle(task)

    def _reshuffle(self, task: Task) -> None:
        order = list(self._rows[task])
        self._rng.shuffle(order)
        self._order[task], self._cursor[task] = order, 0

    def _take(self, task: Task, count: int) -> list[int]:
        order = self._order[task]
        if len(order) - self._cursor[task] < count and count <= len(order):
            self._reshuffle(task)
        taken: list[int] = []
        while len(taken) < count:
            if self._cursor[task] >= len(self._order[task]):
                self._reshuffle(task)
            need = count - len(taken)
            start = self._cursor[task]
            chunk = self._order[task][start : start + need]
            self._cursor[task] = start + len(chunk)
            taken.extend(chunk)
        return taken

    def next_round(self) -> list[tuple[Task, int]]:
        """The (task, row index) pairs of the next gen round, shuffled together."""
        pairs = [(t, i) for t in sorted(self.counts) for i in self._take(t, self.counts[t])]
        self._rng.shuffle(pairs)
        self.num_rounds += 1
        return pairs

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-able state (RNG, orders, cursors, round counter)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "order": {t.value: list(o) for t, o in self._order.items()},
            "cursor": {t.value: c for t, c in self._cursor.items()},
            "num_rounds": self.num_rounds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; the task set must be the same as at save time."""
        saved = {Task(t) for t in state["order"]}
        if saved != set(self._rows):
            raise ValueError(
                f"sampler state has tasks {sorted(t.value for t in saved)}, the corpus has "
                f"{sorted(t.value for t in self._rows)}; resume with the same data.paths and data.tasks"
            )
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = {Task(t): list(o) for t, o in state["order"].items()}
        self._cursor = {Task(t): int(c) for t, c in state["cursor"].items()}
        self.num_rounds = int(state["num_rounds"])
