"""Multi-process (gloo) test harness: run a function on N CPU ranks inside pytest.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes (spawn context), each of which
initialises a gloo process group on a free local port, calls `fn(rank, world_size, *args)` and destroys the
group. The parent waits for all ranks; if any rank raises, the parent raises an AssertionError that carries
that rank's full formatted traceback (sent back over a multiprocessing queue). A rank that fails usually leaves
its peers blocked in a collective, so after the first failure the parent gives the others a short grace period
and then terminates them instead of waiting for the full timeout.

`fn` must be a module-level (picklable) function. Return values are sent back as well (they must be picklable)
and `run_distributed` returns them as a list indexed by rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

_GRACE_AFTER_FAILURE_S = 10.0


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    env: dict[str, str] | None,
    results: Any,
) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    if env:
        os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the per-rank results.

    Raises AssertionError with the failing rank's traceback if a rank raises, exits without reporting
    (e.g. killed), or the whole run exceeds `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, tuple(args), env, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        outcomes, failures = _collect(procs, results, world_size, timeout)
    finally:
        _stop_all(procs)
        results.close()
    if failures:
        msg = "\n".join(f"--- rank {r} failed ---\n{tb}" for r, tb in sorted(failures.items()))
        raise AssertionError(f"run_distributed({fn.__name__}, world_size={world_size}):\n{msg}")
    return [outcomes[r] for r in range(world_size)]


def _collect(
    procs: list[Any], results: Any, world_size: int, timeout: float
) -> tuple[dict[int, Any], dict[int, str]]:
    """Drain the result queue until every rank reported, one failed (plus a grace period), or timeout."""
    outcomes: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) + len(failures) < world_size:
        now = time.monotonic()
        if now >= deadline:
            missing = sorted(set(range(world_size)) - set(outcomes) - set(failures))
            for r in missing:
                failures[r] = f"timed out after {timeout:.0f} s (no result from rank {r})"
            break
        try:
            rank, ok, payload = results.get(timeout=min(0.5, deadline - now))
        except queue.Empty:
            _note_dead_ranks(procs, outcomes, failures, results)
            continue
        if ok:
            outcomes[rank] = payload
        else:
            failures[rank] = payload
            # Peers of a failed rank are typically stuck in a collective: shorten the wait.
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    return outcomes, failures


def _note_dead_ranks(
    procs: list[Any], outcomes: dict[int, Any], failures: dict[int, str], results: Any
) -> None:
    """Record ranks whose process exited without putting a result on the queue."""
    for rank, p in enumerate(procs):
        if rank in outcomes or rank in failures or p.is_alive():
            continue
        # The process may have exited right after putting its result: give the queue a moment.
        try:
            r, ok, payload = results.get(timeout=1.0)
            (outcomes if ok else failures)[r] = payload
            continue
        except queue.Empty:
            pass
        if rank not in outcomes and rank not in failures:
            failures[rank] = f"process exited with code {p.exitcode} without reporting a result"


def _stop_all(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=2.0)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)
