"""One door for scalars: console line, TensorBoard and JSONL; timing spans per phase (docs/style.md,
"logging").

Keys are `section/name` (`questioner/bad_format_frac`, `timing/generate_s`); a timed phase also records the
peak resident memory of the process tree during it (`memory/peak_rss_gb/<phase>`, `memory.PeakTracker`). Only the rank that owns the logger
(rank 0) writes; the others get a logger whose sinks are disabled but whose timers still work, so the loop code
is the same on every rank.

A metric made on several parts (the rollout groups of a round, the rounds of a step) carries its own
reduction: `Sum(value)` for counts, `Mean(total, count)` for fractions and means. `merge_metrics` combines
parts key by key with that reduction, so a new metric merges correctly whatever its name.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from megatron_spell.memory import GB, TRACKER, PeakTracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sum:
    """A count: parts add up."""

    value: float

    def merge(self, other: Sum) -> Sum:
        return Sum(self.value + other.value)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Mean:
    """A ratio `total / count` (0 when nothing was counted): parts add totals and counts."""

    total: float
    count: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Mean:
        """The mean of `values`."""
        values = list(values)
        return cls(float(sum(values)), float(len(values)))

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def merge(self, other: Mean) -> Mean:
        return Mean(self.total + other.total, self.count + other.count)

    def __float__(self) -> float:
        return self.value


Metric = Sum | Mean


def merge_metrics(parts: Iterable[Mapping[str, Metric]]) -> dict[str, Metric]:
    """Combine the metrics of several parts key by key, each with its own reduction.

    A key that is missing from a part contributes nothing there; a key whose parts disagree on the
    reduction is a programming error (TypeError naming the key).
    """
    merged: dict[str, Metric] = {}
    for part in parts:
        for key, metric in part.items():
            if key not in merged:
                merged[key] = metric
            elif type(merged[key]) is not type(metric):
                raise TypeError(
                    f"metric {key}: parts reduce by {type(merged[key]).__name__} and "
                    f"{type(metric).__name__}; one key needs one reduction"
                )
            else:
                merged[key] = merged[key].merge(metric)  # type: ignore[arg-type]
    return merged


def values(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """The scalar value of each metric (what is logged)."""
    return {key: float(metric) for key, metric in metrics.items()}


class MetricsLogger:
    """Collects scalars for one step, then writes them to every enabled sink at `flush(step)`."""

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        jsonl: bool = True,
        memory: PeakTracker | None = None,
    ) -> None:
        self._memory = memory or TRACKER
        self.enabled = enabled and run_dir is not None
        self._pending: dict[str, float] = {}
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def add(self, scalars: Mapping[str, float | int | bool], prefix: str = "") -> None:
        """Queue scalars for the current step (later values of a key replace earlier ones)."""
        for key, value in scalars.items():
            name = f"{prefix}/{key}" if prefix else key
            self._pending[name] = float(value)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Time a phase; adds `timing/<name>_s` (accumulating over repeated spans within a step) and
        `memory/peak_rss_gb/<name>` (the largest peak of those spans)."""
        start = time.perf_counter()
        with self._memory.span() as peak:
            try:
                yield
            finally:
                key = f"timing/{name}_s"
                self._pending[key] = self._pending.get(key, 0.0) + time.perf_counter() - start
        key = f"memory/peak_rss_gb/{name}"
        self._pending[key] = max(self._pending.get(key, 0.0), peak() / GB)

    def flush(self, step: int) -> dict[str, float]:
        """Write the queued scalars for `step` and return them."""
        scalars, self._pending = self._pending, {}
        bad = sorted(k for k, v in scalars.items() if not math.isfinite(v))
        if bad:
            log.warning("step %d: non-finite metrics %s", step, bad)
        if self.enabled:
            if self._tb is not None:
                for key, value in scalars.items():
                    self._tb.add_scalar(key, value, step)
                self._tb.flush()
            if self._jsonl is not None:
                self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
                self._jsonl.flush()
            log.info("step %d | %s", step, format_line(scalars))
        return scalars

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


_CONSOLE_KEYS = (
    "train/loss",
    "train/grad_norm",
    "responder/reward_mean",
    "questioner/reward_mean",
    "questioner/bad_format_frac",
    "verifier/agreement",
    "timing/step_s",
)


def format_line(scalars: Mapping[str, float]) -> str:
    """The short per-step console line: the headline metrics that are present."""
    parts = [f"{k}={scalars[k]:.4g}" for k in _CONSOLE_KEYS if k in scalars]
    return " ".join(parts) if parts else f"{len(scalars)} scalars"


def read_jsonl(path: str | Path) -> list[dict[str, float]]:
    """Read back a metrics.jsonl (the report and the resume test use it)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
