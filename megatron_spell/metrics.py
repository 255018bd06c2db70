"""One door for scalars: console line, TensorBoard and JSONL; timing spans per phase (style.md, "logging").

Keys are `section/name` (`questioner/bad_format_frac`, `timing/generate_s`). Only the rank that owns the logger
(rank 0) writes; the others get a logger whose sinks are disabled but whose timers still work, so the loop code
is the same on every rank.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    """Collects scalars for one step, then writes them to every enabled sink at `flush(step)`."""

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        jsonl: bool = True,
    ) -> None:
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
        """Time a phase; adds `timing/<name>_s` (accumulating over repeated spans within a step)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"timing/{name}_s"
            self._pending[key] = self._pending.get(key, 0.0) + time.perf_counter() - start

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
