"""Multi-process (gloo) test harness: run a function on N CPU ranks inside pytest.

`run_distributed(fn, world_size, *args)` runs `fn(rank, world_size, *args)` on `world_size` spawned
processes, each in a gloo process group on a free local port that is created for the call and destroyed
after it. The parent waits for all ranks; if any rank raises, the parent raises an AssertionError that carries
that rank's full formatted traceback (sent back over a multiprocessing queue). A rank that fails usually leaves
its peers blocked in a collective, so after the first failure the parent gives the others a short grace period
and then terminates them instead of waiting for the full timeout.

The ranks are pooled per (world size, env): importing torch and Megatron costs ~10 s of CPU per process on
the CI machine, more than most tests themselves, so a pool's processes run one call after another. Between
calls each rank destroys every process group and Megatron's parallel state, and restores its environment
variables, working directory and default dtype, so a call sees what a fresh process would. A pool
whose call failed or timed out is terminated (its ranks may be stuck in a collective), and so is one whose
call imported vLLM, which keeps process-global state; the next call spawns a new pool.

`fn` must be a module-level (picklable) function. Return values are sent back as well (they must be picklable)
and `run_distributed` returns them as a list indexed by rank.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
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


def _rank_env(rank: int, world_size: int, env: dict[str, str] | None) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    if env:
        os.environ.update(env)


def _reset_process_state(environ: dict[str, str], cwd: str) -> None:
    """Undo what one task may leave behind in a pooled rank, so the next task sees a fresh process."""
    import sys

    import torch
    import torch.distributed as dist

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        ps.destroy_model_parallel()
    calc = sys.modules.get("megatron.core.num_microbatches_calculator")
    if calc is not None:
        calc.destroy_num_microbatches_calculator()
    if dist.is_initialized():
        dist.destroy_process_group()  # every group of the task, not only the default one
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    gc.collect()


def _pool_worker(
    rank: int, world_size: int, env: dict[str, str] | None, tasks: Any, results: Any
) -> None:
    """A pooled rank: imports once, then runs one task after another, each in a new process group.

    Every task gets its own gloo process group on a fresh port (so no group, and no Megatron parallel
    state, survives from one task to the next) and the process state is reset after it. A task that
    imported vLLM asks to be the rank's last: vLLM keeps process-global state that cannot be reset.
    """
    _rank_env(rank, world_size, env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    environ, cwd = dict(os.environ), os.getcwd()
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process is gone: do not outlive it
                return
            continue
        if task is None:
            return
        task_id, fn, args, port = task
        os.environ["MASTER_PORT"] = str(port)
        try:
            dist.init_process_group(
                backend="gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
            )
            try:
                out = fn(rank, world_size, *args)
            finally:
                _reset_process_state(environ, cwd)
            results.put((task_id, rank, True, out, _tainted()))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            results.put((task_id, rank, False, traceback.format_exc(), True))


def _tainted() -> bool:
    import sys

    return "vllm" in sys.modules


class _Pool:
    """`world_size` spawned ranks that run tasks one after another (see `_pool_worker`)."""

    def __init__(self, world_size: int, env: dict[str, str] | None) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_pool_worker,
                args=(rank, world_size, env, self.tasks[rank], self.results),
                # not daemonic: a task may start processes (the checkpoint writer's manager does)
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.next_id = 0

    def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float
    ) -> tuple[dict[int, Any], dict[int, str], bool]:
        self.next_id += 1
        port = find_free_port()
        for q in self.tasks:
            q.put((self.next_id, fn, args, port))
        return _collect(self.procs, self.results, self.world_size, timeout, self.next_id)

    def close(self) -> None:
        for q in self.tasks:
            with contextlib.suppress(OSError, ValueError):
                q.put(None)
        _stop_all(self.procs)
        for q in (*self.tasks, self.results):
            q.close()


_POOLS: dict[tuple[int, tuple[tuple[str, str], ...]], _Pool] = {}
_MAX_POOLS = 3  # each rank holds torch + Megatron in memory (~0.5 GB): world sizes 1, 2 and 4


def _pool(world_size: int, env: dict[str, str] | None) -> _Pool:
    key = (world_size, tuple(sorted((env or {}).items())))
    pool = _POOLS.pop(key, None)
    if pool is None or any(not p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _Pool(world_size, env)
    _POOLS[key] = pool  # most recently used last
    while len(_POOLS) > _MAX_POOLS:
        _POOLS.pop(next(iter(_POOLS))).close()
    return pool


def _drop_pool(world_size: int, env: dict[str, str] | None) -> None:
    pool = _POOLS.pop((world_size, tuple(sorted((env or {}).items()))), None)
    if pool is not None:
        pool.close()


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    fresh: bool = False,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the per-rank results.

    Raises AssertionError with the failing rank's traceback if a rank raises, exits without reporting
    (e.g. killed), or the whole run exceeds `timeout` seconds. The ranks are pooled (see the module
    docstring); a pool whose task failed, timed out or imported vLLM is closed after it. `fresh=True`
    runs `fn` in newly spawned processes that are not reused (for a test of what importing does).
    """
    pool = _Pool(world_size, env) if fresh else _pool(world_size, env)
    ok = False
    try:
        outcomes, failures, tainted = pool.run(fn, tuple(args), timeout)
        ok = not failures and not tainted and not fresh
    finally:
        if not ok:
            if fresh:
                pool.close()
            else:
                _drop_pool(world_size, env)
    if failures:
        msg = "\n".join(f"--- rank {r} failed ---\n{tb}" for r, tb in sorted(failures.items()))
        raise AssertionError(f"run_distributed({fn.__name__}, world_size={world_size}):\n{msg}")
    return [outcomes[r] for r in range(world_size)]


def _collect(
    procs: list[Any], results: Any, world_size: int, timeout: float, task_id: int
) -> tuple[dict[int, Any], dict[int, str], bool]:
    """Drain the result queue until every rank reported, one failed (plus a grace period), or timeout.

    Returns the results by rank, the failures by rank, and whether a rank asked to be retired.
    """
    outcomes: dict[int, Any] = {}
    failures: dict[int, str] = {}
    tainted = False
    deadline = time.monotonic() + timeout
    while len(outcomes) + len(failures) < world_size:
        now = time.monotonic()
        if now >= deadline:
            missing = sorted(set(range(world_size)) - set(outcomes) - set(failures))
            for r in missing:
                failures[r] = f"timed out after {timeout:.0f} s (no result from rank {r})"
            break
        try:
            tid, rank, ok, payload, retire = results.get(timeout=min(0.5, deadline - now))
        except queue.Empty:
            _note_dead_ranks(procs, outcomes, failures, results, task_id)
            continue
        if tid != task_id:  # a late answer to an earlier task: cannot happen in a live pool
            continue
        tainted |= retire
        if ok:
            outcomes[rank] = payload
        else:
            failures[rank] = payload
            # Peers of a failed rank are typically stuck in a collective: shorten the wait.
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    return outcomes, failures, tainted


def _note_dead_ranks(
    procs: list[Any],
    outcomes: dict[int, Any],
    failures: dict[int, str],
    results: Any,
    task_id: int,
) -> None:
    """Record ranks whose process exited without putting a result on the queue."""
    for rank, p in enumerate(procs):
        if rank in outcomes or rank in failures or p.is_alive():
            continue
        # The process may have exited right after putting its result: give the queue a moment.
        try:
            tid, r, ok, payload, _ = results.get(timeout=1.0)
            if tid == task_id:
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
