"""Peak resident memory (RSS) of this process tree per phase, for the step metrics
(`memory/peak_rss_gb/<phase>`, written by `metrics.MetricsLogger.timer`).

How a phase's peak is taken:

* this process: on Linux the kernel keeps the peak RSS ("high water mark", `VmHWM` in
  /proc/self/status) and resets it to the current RSS when "5" is written to /proc/self/clear_refs.
  A phase resets it at its start and reads it at its end: the exact peak of the span, with no
  sampling thread. Nested phases share the one counter: an inner phase first folds the outer
  phase's peak so far into the outer's record, and its own peak into the outer's when it ends;
* the process's children (vLLM runs in-process here, `VLLM_ENABLE_V1_MULTIPROCESSING=0`; what
  remains are helpers such as dist_checkpointing's multiprocessing manager): each live descendant
  adds its own lifetime peak (`VmHWM`) at the phase's end. The sum is an upper bound of the tree's
  peak (the peaks need not coincide); a descendant that started and ended inside the phase is
  missed;
* elsewhere (no /proc, e.g. macOS) or when the reset is refused: the process's lifetime peak
  (`resource.getrusage`), which never decreases, so a phase reports the peak so far.

RSS counts shared pages (the mapped torch and vLLM libraries) in every process that maps them, so a
sum over processes over-counts; that errs on the safe side for a memory budget.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

GB = 1e9
"""The unit of the memory metrics and reports (decimal gigabytes, as budgets are usually stated)."""
_PROC = Path("/proc")


def _status_kib(pid: int | str, field: str) -> int | None:
    """A `VmXXX` field of /proc/PID/status in KiB, or None when it cannot be read."""
    try:
        with open(_PROC / str(pid) / "status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc/PID/task/*/children; [] when unavailable)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list((_PROC / str(parent) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def lifetime_peak_bytes() -> int:
    """This process's peak RSS since it started (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def children_peak_bytes() -> int:
    """The largest peak RSS of any child that has exited and been waited for (getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakTracker:
    """Per-span peak RSS of this process and its descendants (see the module docstring).

    `span()` yields a callable that returns the span's peak in bytes once the span has ended.
    `reset` and `read_own` are injectable for tests (defaults: /proc/self/clear_refs and VmHWM).
    """

    def __init__(
        self,
        *,
        reset: Callable[[], bool] | None = None,
        read_own: Callable[[], int] | None = None,
        read_children: Callable[[], int] | None = None,
    ) -> None:
        self._reset = reset or _reset_hwm
        self._read_own = read_own or _own_hwm_bytes
        self._read_children = read_children or _children_hwm_bytes
        # running peak of each open span, innermost last
        self._open: list[int] = []

    def _fold(self) -> int:
        """The peak since the last reset, then reset; the lifetime peak when resets fail."""
        peak = self._read_own()
        self._reset()
        return peak

    @contextmanager
    def span(self) -> Iterator[Callable[[], int]]:
        result = [0]
        if self._open:
            self._open[-1] = max(self._open[-1], self._fold())
        else:
            self._reset()
        self._open.append(0)
        try:
            yield lambda: result[0]
        finally:
            own = max(self._open.pop(), self._fold())
            if self._open:
                self._open[-1] = max(self._open[-1], own)
            result[0] = own + self._read_children()


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open(_PROC / "self" / "clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _own_hwm_bytes() -> int:
    kib = _status_kib("self", "VmHWM")
    return kib * 1024 if kib is not None else lifetime_peak_bytes()


def _children_hwm_bytes() -> int:
    return sum((_status_kib(pid, "VmHWM") or 0) * 1024 for pid in _children(os.getpid()))


def tree_rss_bytes(pid: int | None = None) -> int:
    """The current RSS of `pid` (default: this process) plus all its live descendants."""
    pid = os.getpid() if pid is None else pid
    return sum((_status_kib(p, "VmRSS") or 0) * 1024 for p in [pid, *_children(pid)])


TRACKER = PeakTracker()
"""The process's tracker: the kernel's peak counter is per process, so every span shares one."""


GIB = float(1 << 30)


def device_memory() -> dict[str, float]:
    """This rank's memory at a phase transition of the colocated step (`loop.PhaseLog`).

    On CUDA (GiB, as vLLM and Megatron state their budgets): what torch's allocator has allocated and
    reserved, and the device's free memory (`cudaMemGetInfo`, which also sees vLLM's sleep-mode pool
    and NCCL's buffers). On CPU: the process's resident memory (GiB).
    """
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return {
            "allocated_gib": torch.cuda.memory_allocated() / GIB,
            "reserved_gib": torch.cuda.memory_reserved() / GIB,
            "free_gib": free / GIB,
        }
    return {"rss_gib": (_status_kib("self", "VmRSS") or 0) * 1024 / GIB}


def empty_cache() -> None:
    """Give the CUDA caching allocator's free blocks back to the device (a no-op on CPU)."""
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
