"""Peak-RSS bookkeeping per phase (memory.PeakTracker, MetricsLogger's memory/peak_rss_gb keys)."""

import os
import subprocess
import sys

import pytest

from megatron_spell.memory import GB, PeakTracker, _children, tree_rss_bytes
from megatron_spell.metrics import MetricsLogger


class FakeProcess:
    """A kernel peak counter: `rss` moves, `hwm` follows its maximum, `reset` sets hwm to rss."""

    def __init__(self) -> None:
        self.rss = self.hwm = 1

    def set(self, rss: int) -> None:
        self.rss = rss
        self.hwm = max(self.hwm, rss)

    def reset(self) -> bool:
        self.hwm = self.rss
        return True

    def tracker(self, children: int = 0) -> PeakTracker:
        return PeakTracker(
            reset=self.reset, read_own=lambda: self.hwm, read_children=lambda: children
        )


def test_span_peak_is_the_maximum_inside_the_span_only():
    p = FakeProcess()
    t = p.tracker()
    p.set(50)  # before any span: not counted
    p.set(2)
    with t.span() as peak:
        p.set(7)
        p.set(3)
    assert peak() == 7
    with t.span() as peak:
        p.set(4)
    assert peak() == 4  # the earlier 50 and 7 are gone


def test_nested_spans_keep_the_outer_peak_before_the_inner_reset():
    p = FakeProcess()
    t = p.tracker()
    with t.span() as outer:
        p.set(10)
        p.set(2)
        with t.span() as inner:  # resets the counter: the outer's 10 must survive
            p.set(5)
            p.set(2)
        p.set(3)
    assert (inner(), outer()) == (5, 10)
    with t.span() as outer:
        with t.span() as inner:
            p.set(8)
            p.set(1)
        p.set(4)
    assert (inner(), outer()) == (8, 8)  # the inner peak counts for the outer span too


def test_children_peaks_are_added():
    p = FakeProcess()
    with p.tracker(children=100).span() as peak:
        p.set(6)
    assert peak() == 106


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_real_counter_sees_a_freed_allocation_and_forgets_it_after():
    t = PeakTracker()
    size = 256 << 20
    with t.span() as first:
        block = b"\x01" * size  # written, so resident
        del block
    with t.span() as second:
        pass
    assert first() - second() > 0.8 * size


def test_tree_rss_counts_a_child_process():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = b'1' * (64 << 20); print(1, flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline().strip() == b"1"
        assert child.pid in _children(os.getpid())
        own = tree_rss_bytes(child.pid)
        assert own > 64 << 20
        assert tree_rss_bytes() >= own
    finally:
        child.kill()
        child.wait()


def test_timer_records_the_largest_peak_of_the_spans_of_a_step(tmp_path):
    p = FakeProcess()
    logger = MetricsLogger(tmp_path, tensorboard=False, memory=p.tracker())
    with logger.timer("train"):
        p.set(int(3 * GB))
        p.set(1)
    with logger.timer("train"):
        p.set(int(2 * GB))
    with logger.timer("sync"):
        p.set(int(1.5 * GB))
    out = logger.flush(1)
    assert out["memory/peak_rss_gb/train"] == pytest.approx(3.0)
    assert out["memory/peak_rss_gb/sync"] == pytest.approx(2.0)  # rss was 2 GB when sync began
    with logger.timer("train"):
        p.set(int(0.5 * GB))
    assert logger.flush(2)["memory/peak_rss_gb/train"] == pytest.approx(1.5)  # a new step restarts
    logger.close()


def test_demo_prints_its_dtype_and_the_peak_of_each_phase(tmp_path):
    import json
    from pathlib import Path

    from megatron_spell.config import load_config
    from megatron_spell.demo import _phase_peaks, describe

    root = Path(__file__).resolve().parents[2]
    line = describe(load_config(root / "configs/demo.yaml", ["model.dtype=bf16"]))
    assert "model.dtype=bf16 in Megatron and vLLM" in line and "train.recompute=full" in line
    rows = [
        {"step": 1, "memory/peak_rss_gb/generate": 3.0, "memory/peak_rss_gb/train": 6.25},
        {"step": 2, "memory/peak_rss_gb/generate": 3.5, "memory/peak_rss_gb/train": 6.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _phase_peaks(tmp_path) == ["  peak by phase : generate 3.50 GB, train 6.25 GB"]
    assert _phase_peaks(tmp_path / "missing") == []
