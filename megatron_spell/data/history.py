"""History memory of successful questions per (task, question_id) (spec section 4.1).

Each key holds a bounded deque (`size`, 3 in the reference) of `HistoryEntry(evidence, question, answer)`.
`record` appends a new question when its responder success rate (mean combined reward) passes the gate;
`entries` returns what the next questioner prompt for that row shows as examples and whose evidence union it
re-uses (see data/curriculum.py).

Deliberate decisions (spec section 9 item 2):

* The success gate defaults to the paper's r^que > 0, i.e. 0 < mean < 1 (at least one but not all responses
  correct). The reference gate [0.01, 1.0] inclusive also stores "too easy" questions (mean 1.0). Both are
  expressible: `lower`, `upper` and `inclusive` are parameters (`HistoryMemory(lower=0.01, upper=1.0,
  inclusive=True)` is the reference).
* De-duplication works: a question whose normalised text (case-folded, whitespace collapsed) is already in the
  key's deque is not appended again (the reference compared the wrong tuple slots and appended duplicates).
* Spec 9 item 15: the memory is serialisable (`state_dict` / `load_state_dict`, plain JSON types) so a resume
  keeps it; the reference loses it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_spell.types import HistoryEntry, Task


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


class HistoryMemory:
    """Bounded per-(task, question_id) memory of successful questions (module docstring)."""

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
        self._store: dict[str, deque[HistoryEntry]] = {}

    @staticmethod
    def key(task: Task | str, question_id: str) -> str:
        return f"{Task(task).value}_{question_id}"

    def passes_gate(self, success_rate: float) -> bool:
        """Whether a question with this responder mean reward is remembered."""
        if self.inclusive:
            return self.lower <= success_rate <= self.upper
        return self.lower < success_rate < self.upper

    def entries(self, task: Task | str, question_id: str) -> list[HistoryEntry]:
        """The remembered entries of a row, oldest first (empty if none)."""
        return list(self._store.get(self.key(task, question_id), ()))

    def record(
        self,
        task: Task | str,
        question_id: str,
        entry: HistoryEntry,
        success_rate: float,
    ) -> bool:
        """Remember `entry` if it passes the gate and is not a duplicate; returns whether it was stored."""
        if not self.passes_gate(success_rate):
            return False
        queue = self._store.setdefault(self.key(task, question_id), deque(maxlen=self.size))
        if any(_norm(e.question) == _norm(entry.question) for e in queue):
            return False
        queue.append(entry)
        return True

    def __len__(self) -> int:
        return len(self._store)

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-able contents and settings."""
        return {
            "size": self.size,
            "lower": self.lower,
            "upper": self.upper,
            "inclusive": self.inclusive,
            "entries": {
                k: [[list(e.evidence), e.question, e.answer] for e in q]
                for k, q in self._store.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the contents of a `state_dict()`; the current size bounds each deque."""
        self._store = {}
        for key, items in state.get("entries", {}).items():
            queue: deque[HistoryEntry] = deque(maxlen=self.size)
            for evidence, question, answer in items:
                queue.append(HistoryEntry(tuple(int(i) for i in evidence), question, answer))
            self._store[key] = queue

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


def evidence_union(entries: Sequence[HistoryEntry]) -> list[int]:
    """Sorted union of the evidence indices of `entries`."""
    return sorted({i for e in entries for i in e.evidence})
