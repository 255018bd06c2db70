"""Run the test suite's pytest processes (`make test`) and tabulate their wall and CPU times.

    python tools/run_tests.py [--lanes N] [-- PYTEST_ARGS...]

The suite is a list of pytest invocations: the unit/dist/GPU tier (one process) and one process per
end-to-end folder (vLLM keeps process-global parallel state, so one folder's engines must not see
another's teardown), `--lanes` of them side by side (default: the CPU count, at most 2; each lane
runs its share in order). On the 2-core development machine two lanes took 1144 s and one lane 1222 s
(clean-clone CI runs of the same suite): most of what running side by side could win is lost to
oversubscription (ranks, vLLM's threads and gloo's polling), the processes' CPU time grew from 1752 s
to 2162 s. Every output line is prefixed with its invocation's name; at the end a table gives each
invocation's wall time, CPU time (its own and its reaped ranks') and exit status, and the exit status
is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, pytest arguments), longest first: lanes take the next one when free
SUITE = [
    ("unit", ["--ignore=tests/e2e"]),
    ("e2e-train", ["tests/e2e/test_spell_train.py"]),
    ("e2e-convert", ["tests/e2e/convert"]),
    ("e2e-eval", ["tests/e2e/eval"]),
    ("e2e-rollout", ["tests/e2e/rollout"]),
]


def _run(
    name: str, args: list[str], extra: list[str], lock: threading.Lock
) -> tuple[int, float, float]:
    """Run one invocation; its exit status, wall seconds and CPU seconds."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()
    _, status, usage = os.wait4(proc.pid, 0)  # CPU time of the process and the ranks it reaped
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - t0, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--lanes", type=int, default=min(2, os.cpu_count() or 1), help="invocations side by side"
    )
    lanes = max(1, ap.parse_args(own).lanes)

    todo = list(SUITE)
    results: dict[str, tuple[int, float, float]] = {}
    lock, queue_lock = threading.Lock(), threading.Lock()

    def lane() -> None:
        while True:
            with queue_lock:
                if not todo:
                    return
                name, args = todo.pop(0)
            results[name] = _run(name, args, extra, lock)

    t0 = time.monotonic()
    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    print(f"\n{'invocation':<12} {'wall s':>8} {'CPU s':>8}  status")
    for name, _ in SUITE:
        rc, sec, cpu = results[name]
        print(f"{name:<12} {sec:>8.1f} {cpu:>8.1f}  {'ok' if rc == 0 else f'FAILED (exit {rc})'}")
    failed = [n for n, (rc, _, _) in results.items() if rc != 0]
    print(
        f"{'suite':<12} {wall:>8.1f}  {lanes} lanes, {'FAILED: ' + ', '.join(failed) if failed else 'ok'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
