"""Run a command and report the peak resident memory of its whole process tree, and its wall time.

    python tools/peak_rss.py [--interval 0.2] -- make demo

`/usr/bin/time -v` reports the largest single process ("Maximum resident set size"), not the sum over
a tree of processes. This samples the RSS of the command and all its live descendants every
`--interval` seconds (from /proc, Linux) and prints the largest sum seen, the largest single-process
peak (the kernel's VmHWM, exact) and the wall time. A sum peak shorter than one interval can be missed;
shared library pages count once per process (over-counting, the safe side for a budget).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_spell.memory import GB, _children, _status_kib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_sum, peak_one, at = 0, 0, 0.0
    hwm: dict[int, int] = {}
    while proc.poll() is None:
        pids = [proc.pid, *_children(proc.pid)]
        total = sum((_status_kib(p, "VmRSS") or 0) * 1024 for p in pids)
        for p in pids:
            hwm[p] = max(hwm.get(p, 0), (_status_kib(p, "VmHWM") or 0) * 1024)
        if total > peak_sum:
            peak_sum, at = total, time.perf_counter() - t0
        peak_one = max(peak_one, *hwm.values())
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    print(
        f"peak_rss: process tree {peak_sum / GB:.2f} GB (sampled every {args.interval} s, "
        f"at {at:.0f} s); largest single process {peak_one / GB:.2f} GB; "
        f"{len(hwm)} processes; wall {wall:.0f} s; exit code {proc.returncode}",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
