"""A fake `time` module for timer tests (megatron_spell/metrics.py reads `time.perf_counter`)."""

from __future__ import annotations


class FakeClock:
    """A `time` stand-in whose perf_counter advances `step` seconds per call from `start`, so a
    timer span (two calls) is exactly `step` seconds."""

    def __init__(self, *, start: float = 0.0, step: float = 1.0) -> None:
        self.now = start
        self.step = step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now
