"""`megatron-spell train`: config -> distributed -> build -> resume -> steps -> checkpoints -> report.

Every rank of a `torchrun`/`srun` job runs this (SPMD, docs/architecture.md); a plain `python -m
megatron_spell train` is one rank. Each rank holds its Megatron shard and a colocated vLLM engine
(rollout data-parallel groups of `rollout.tensor_parallel_size` ranks); the loop itself is
`loop.spell_step`.

Preemption: SIGTERM (Slurm sends it before killing a job) sets a flag; the current step finishes, a checkpoint
is written and the process exits with `REQUEUE_EXIT_CODE`. Under torchrun, the agent forwards SIGTERM to its
ranks, kills them after `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (default 30, too short for a step) and exits
non-zero whatever their codes; examples/slurm/spell.sbatch therefore raises that timeout and requeues when it
forwarded a SIGTERM (or saw code 42). Resume is automatic from the latest complete checkpoint of the run
directory; a kill during the save leaves the previous checkpoint loadable.

`checkpoint.export_hf`: after the final checkpoint the run also writes `<run_dir>/hf/`, streamed from
the live shards (`MegatronPolicy.export_hf`: the gather of the per-step vLLM weight sync, rank 0 writing
the safetensors) rather than re-read from the checkpoint just saved, which would need one rank to
build the whole model a second time next to the training state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_spell import preflight
from megatron_spell.checkpointing import CheckpointManager, RLState, capture_rng, restore_rng
from megatron_spell.collectives import (
    HostGroups,
    any_rank,
    gather_rollout_results,
    new_host_groups,
)
from megatron_spell.config import Config, dump_config, format_config
from megatron_spell.loop import Collective, Run, replay_step, spell_step, start_rollout
from megatron_spell.memory import device_memory, empty_cache
from megatron_spell.metrics import MetricsLogger
from megatron_spell.preflight import DryRun

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 42


class _Preemption:
    """SIGTERM -> finish the step, checkpoint, exit with REQUEUE_EXIT_CODE."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning(
            "SIGTERM received: will checkpoint after this step and exit %d", REQUEUE_EXIT_CODE
        )
        self.requested = True


def _collective(groups: HostGroups) -> Collective:
    """The loop's collectives on the gloo groups (never the default group, NCCL on GPU)."""
    import torch.distributed as dist

    tp = groups.rollout_tp_size
    return Collective(
        rollout_rank=dist.get_rank() // tp,
        rollout_world=dist.get_world_size() // tp,
        is_writer=dist.get_rank() == 0,
        all_gather_object=functools.partial(gather_rollout_results, groups=groups),
    )


def build_run(
    config: Config, checked: DryRun, *, replay: bool = False
) -> tuple[Run, Any, Any, HostGroups]:
    """Build data, model, optimizer and (unless replaying) the vLLM engine for this rank.

    `checked` is the pre-flight's result (the corpus it loaded and checked).
    """
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_spell.chat import as_chat_renderer
    from megatron_spell.data.curriculum import CurriculumSchedule
    from megatron_spell.data.history import HistoryMemory
    from megatron_spell.data.sampler import DomainSampler, assign_tasks
    from megatron_spell.mcore.checkpoint import DTYPES
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import init_parallel
    from megatron_spell.mcore.policy import MegatronPolicy

    # vLLM's sleep mode needs NCCL's cuMem allocations off in every communicator, Megatron's too,
    # which exist before vLLM is imported (verl sets it globally: verl/trainer/constants_ppo.py)
    os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
    ctx = init_parallel(config.parallel, seed=config.train.seed)
    groups = new_host_groups(config.rollout.tensor_parallel_size)
    d = config.data
    corpus = checked.corpus
    log.info("corpus: %s", checked.corpus_stats)
    task_rows = assign_tasks(corpus, d.tasks, random.Random(d.seed))
    sampler = DomainSampler(task_rows, d.domain_weights, d.gen_batch_size, seed=d.seed)
    history = HistoryMemory(
        d.history_size, lower=d.history_lower, upper=d.history_upper, inclusive=True
    )
    curriculum = CurriculumSchedule(
        docs_per_stage=d.curriculum_docs, steps_per_stage=d.curriculum_steps_per_stage
    )
    hf_config = load_hf_config(config.model.hf_dir)
    policy = MegatronPolicy(config, ctx, hf_config)
    engine, chat = None, None
    if not replay:
        from megatron_spell.rollout.engine import RolloutEngine
        from megatron_spell.rollout.roles import RoleEngine

        dtype = str(DTYPES[config.model.dtype]).removeprefix("torch.")  # vLLM's dtype name
        engine = RoleEngine(
            RolloutEngine(
                config.model.hf_dir,
                config.rollout,
                dtype=dtype,
                routing_replay=config.train.routing_replay,
                dummy_weights=True,  # start_rollout syncs the policy's weights before generating
            ),
            structured=config.rollout.structured_outputs,
            sleep_level=config.rollout.sleep_level,
        )
        chat = as_chat_renderer(AutoTokenizer.from_pretrained(config.model.hf_dir))
    rank = dist.get_rank()
    metrics = MetricsLogger(
        config.run_dir,
        enabled=rank == 0,
        tensorboard=config.logging.tensorboard,
        jsonl=config.logging.jsonl,
    )
    run = Run(
        config=config,
        corpus=corpus,
        sampler=sampler,
        history=history,
        curriculum=curriculum,
        engine=engine,
        chat=chat,
        policy=policy,
        metrics=metrics,
        collective=_collective(groups),
        rng=random.Random(config.train.seed),
        doc_rng=random.Random(config.train.seed + 1),
        reseed=functools.partial(_reseed, config.rollout.seed),
        device_memory=device_memory,
        empty_cache=empty_cache,
    )
    return run, ctx, policy, groups


@contextlib.contextmanager
def _resident(policy: Any) -> Iterator[None]:
    """The training state on the device for a checkpoint or an export, then off it again for the
    next generation (loop.update_and_sync)."""
    policy.onload()
    try:
        yield
    finally:
        policy.offload_training_state()
        policy.offload_params()


def _reseed(seed: int, step: int) -> None:
    """Same sampling randomness for step `step` on every rank and after any resume."""
    import torch

    torch.manual_seed(seed * 1_000_003 + step)


def _state(run: Run) -> RLState:
    return RLState(
        step=run.step,
        sampler=run.sampler.state_dict(),
        history=run.history.state_dict(),
        curriculum={"stage": run.curriculum.stage(run.step)},
        rng={"global": capture_rng(), "batch": run.rng.getstate(), "docs": run.doc_rng.getstate()},
    )


def _restore(run: Run, state: RLState) -> None:
    run.step = state.step
    run.sampler.load_state_dict(state.sampler)
    run.history.load_state_dict(state.history)
    restore_rng(state.rng.get("global", {}))
    run.rng.setstate(state.rng["batch"])
    run.doc_rng.setstate(state.rng["docs"])


def run(config: Config, *, replay_dir: str | None = None) -> int:
    """Train until `train.total_steps`; returns the process exit code.

    The pre-flight (`preflight.dry_run`, what `train --dry-run` runs) comes first, on every rank and
    before torch.distributed starts: a setting that cannot run fails here, not after the build.
    """
    import torch.distributed as dist

    world = preflight.launched_world_size()
    preflight.check_launched_world(config, world)
    checked = preflight.dry_run(config, world_size=world, replay_dir=replay_dir)
    run_dir = Path(config.run_dir)
    preempt = _Preemption()
    run_, _ctx, policy, groups = build_run(config, checked, replay=replay_dir is not None)
    rank = dist.get_rank()
    if rank == 0:
        dump_config(config, run_dir / "config.yaml")
        log.info("resolved config:\n%s", format_config(config))
    ckpt = CheckpointManager(
        run_dir / "checkpoints",
        keep_last=config.checkpoint.keep_last,
        rank=rank,
        barrier=dist.barrier,
    )
    latest = ckpt.latest() if config.checkpoint.resume == "auto" else None
    if latest is not None:
        log.info("resuming from %s", latest)
        policy.load(latest / "model")
        _restore(run_, CheckpointManager.load_state(latest))
    if run_.engine is not None:
        sync = start_rollout(run_)  # vLLM started with dummy weights
        log.info("initial weight sync: %.1f GB in %.1f s", sync["bytes"] / 1e9, sync["seconds"])

    def save() -> None:
        with run_.metrics.timer("checkpoint"), _resident(policy):
            ckpt.save(run_.step, lambda tmp: policy.save(tmp / "model"), _state(run_))

    exit_code = 0
    while run_.step < config.train.total_steps:
        if replay_dir is not None:
            replay_step(run_, Path(replay_dir))
        else:
            spell_step(run_)
        interval = config.checkpoint.save_interval
        if any_rank(preempt.requested, groups):
            save()
            log.warning(
                "preempted: checkpoint of step %d written; exiting with code %d (requeue)",
                run_.step,
                REQUEUE_EXIT_CODE,
            )
            exit_code = REQUEUE_EXIT_CODE
            break
        if interval and run_.step % interval == 0 and run_.step < config.train.total_steps:
            save()
    else:
        save()
        if config.checkpoint.export_hf:
            with _resident(policy):
                policy.export_hf(run_dir / "hf")
    run_.metrics.close()
    if rank == 0 and exit_code == 0:
        from megatron_spell.report import write_report

        log.info(write_report(run_dir))
        log.info("run directory: %s (tensorboard --logdir %s)", run_dir, run_dir / "tensorboard")
    dist.barrier()
    return exit_code
