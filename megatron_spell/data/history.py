"""History memory of successful questions per (task, data_source, question_id)
(docs/spell-algorithm.md §4.1).

Each key holds a bounded deque (`size`, 3 in the reference) of `HistoryEntry(evidence, question,
answer)`. `record` appends a new question when its responder success rate (mean combined reward)
passes the gate; `entries` returns what the next questioner prompt for that row shows as examples
and whose evidence union it re-uses (see data/curriculum.py).

Deliberate decisions (D2 and D12):

* The key includes the row's data source. The reference keys by `f"{task}_{question_id}"` only (it
  mixes two corpora), so two rows of different sources that feed the same task and share an id
  (numeric ids restart at 0 in every file) would share one memory: the second row would be shown the
  first row's questions and re-use its evidence indices. Pass `data_source=` to `entries` and
  `record`; the corpus loader rejects a duplicate (data_source, question_id) pair, so the key names
  exactly one row. A call without `data_source` uses the key (task, None, question_id), the old
  keying, for callers that still pass none.
* The success gate defaults to the paper's r^que > 0, i.e. 0 < mean < 1 (at least one but not all
  responses correct). The reference gate [0.01, 1.0] inclusive also stores "too easy" questions
  (mean 1.0). Both are expressible: `lower`, `upper` and `inclusive` are parameters
  (`HistoryMemory(lower=0.01, upper=1.0, inclusive=True)` is the reference).
* De-duplication works: a question whose normalised text (case-folded, whitespace collapsed) is
  already in the key's deque is not appended again (the reference compared the wrong tuple slots and
  appended duplicates).
* D12: the memory is serialisable (`state_dict` / `load_state_dict`, plain JSON types) so a
  resume keeps it; the reference loses it. A state written before the data source was part of the
  key (its `entries` a mapping `"{task}_{question_id}" -> entries`) loads under data_source None,
  with a warning.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_spell.types import HistoryEntry, Task

logger = logging.getLogger(__name__)
Key = tuple[str, str | None, str]
STATE_VERSION = 2


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


class HistoryMemory:
    """Bounded per-(task, data_source, question_id) memory of successful questions (module docstring)."""

    def __init__(
        self,
        size: int = 3,
        *,
        lower: float = 0.0,
        upper: float = 1.0,
        inclusive: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"data.history_size={size} must be >= 1")
        if not 0.0 <= lower <= upper <= 1.0:
            raise ValueError(f"history gate [{lower}, {upper}]: need 0 <= lower <= upper <= 1")
        self.size, self.lower, self.upper, self.inclusive = size, lower, upper, inclusive
        self._store: dict[Key, deque[HistoryEntry]] = {}

    @staticmethod
    def key(task: Task | str, question_id: str, data_source: str | None = None) -> Key:
        """The memory key of one corpus row and task."""
        task_name = task.value if isinstance(task, Task) else str(task)
        return (task_name, None if data_source is None else str(data_source), str(question_id))

    def passes_gate(self, success_rate: float) -> bool:
        """Whether a question with this responder mean reward is remembered."""
        if self.inclusive:
            return self.lower <= success_rate <= self.upper
        return self.lower < success_rate < self.upper

    def entries(
        self, task: Task | str, question_id: str, *, data_source: str | None = None
    ) -> list[HistoryEntry]:
        """The remembered entries of a row, oldest first (empty if none)."""
        return list(self._store.get(self.key(task, question_id, data_source), ()))

    def record(
        self,
        task: Task | str,
        question_id: str,
        entry: HistoryEntry,
        success_rate: float,
        *,
        data_source: str | None = None,
    ) -> bool:
        """Remember `entry` if it passes the gate and is not a duplicate; returns whether it was stored."""
        if not self.passes_gate(success_rate):
            return False
        key = self.key(task, question_id, data_source)
        queue = self._store.setdefault(key, deque(maxlen=self.size))
        if any(_norm(e.question) == _norm(entry.question) for e in queue):
            return False
        queue.append(entry)
        return True

    def __len__(self) -> int:
        return len(self._store)

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-able contents and settings: `rows` lists [task, data_source, question_id, entries]."""
        return {
            "version": STATE_VERSION,
            "size": self.size,
            "lower": self.lower,
            "upper": self.upper,
            "inclusive": self.inclusive,
            "rows": [
                [task, source, qid, [[list(e.evidence), e.question, e.answer] for e in q]]
                for (task, source, qid), q in self._store.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the contents of a `state_dict()`; the current size bounds each deque."""
        self._store = {}
        for task, source, qid, items in state.get("rows", []):
            self._store[(task, source, qid)] = self._queue(items)
        legacy = state.get("entries", {})
        for old_key, items in legacy.items():
            task, qid = _split_legacy_key(old_key)
            self._store[(task, None, qid)] = self._queue(items)
        if legacy:
            logger.warning(
                "history memory: %d rows come from a state keyed without the data source; they are "
                "kept under data_source None and only calls that pass no data_source see them",
                len(legacy),
            )

    def _queue(self, items: Sequence[Sequence[Any]]) -> deque[HistoryEntry]:
        queue: deque[HistoryEntry] = deque(maxlen=self.size)
        for evidence, question, answer in items:
            queue.append(HistoryEntry(tuple(int(i) for i in evidence), question, answer))
        return queue

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> HistoryMemory:
        memory = cls(
            int(state["size"]),
            lower=float(state["lower"]),
            upper=float(state["upper"]),
            inclusive=bool(state["inclusive"]),
        )
        memory.load_state_dict(state)
        return memory


def _split_legacy_key(key: str) -> tuple[str, str]:
    """(task, question_id) of an old `"{task}_{question_id}"` key (task names contain "_" too)."""
    for task in sorted((t.value for t in Task), key=len, reverse=True):
        if key.startswith(task + "_"):
            return task, key[len(task) + 1 :]
    task, _, qid = key.rpartition("_")
    return task, qid


def evidence_union(entries: Sequence[HistoryEntry]) -> list[int]:
    """Sorted union of the evidence indices of `entries`."""
    return sorted({i for e in entries for i in e.evidence})
