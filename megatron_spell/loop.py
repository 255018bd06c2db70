"""One SPELL step as straight-line code (docs/spell-algorithm.md §1.1): the file to read next to the
paper.

    repeat (one gen round):
        questioner prompts  <- domain sampler + history memory + document curriculum      (§4)
        round               <- questioner -> grounding filter -> responder x n -> verifier x n
                               -> Eq. 6 rewards                                          (gen_round)
        history memory      <- questions whose success passes the gate                   (§4.1)
        accumulate; dynamic-sampling filter                                              (§1.5)
    until enough responder groups (or an error after spell.max_num_gen_batches rounds)
    final batch -> advantages (Eq. 8-9) -> one policy update on all roles (Megatron)     (§1.6-§1.7, §5)
    weights -> vLLM; metrics; checkpoint

Around the update the device changes hands (docs/architecture.md "One step on one device",
`update_and_sync`): vLLM sleeps, Megatron's state comes back, the update runs, the spent grads and
(as configured) the optimizer state leave, vLLM wakes its weights, the sync fills them, the
parameters leave (as configured) and vLLM wakes its KV cache. The memory at every transition is logged
(one line per step, `memory/<transition>/*` scalars).

The model, the engine and the collectives are injected (`train.py` builds them), so this file imports neither
Megatron nor vLLM. Every rank runs the same code (SPMD): each rollout group generates its share of the round's
questioner prompts, the round results are gathered everywhere, and from then on every rank holds the same
accumulator, memory and batch, and trains its data-parallel share of it.

Deviation (D11): with `spell.on_batch_shortfall="train_available"` a step that still lacks
groups after `spell.max_num_gen_batches` rounds trains on what it has (logged as `batch/shortfall`) instead of
aborting the run; the default "error" keeps the reference's behaviour with a message that names the knobs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from megatron_spell.chat import ChatRenderer
from megatron_spell.config import Config
from megatron_spell.data.curriculum import CurriculumSchedule, draw_num_new_docs, select_documents
from megatron_spell.data.history import HistoryMemory
from megatron_spell.data.sampler import DomainSampler
from megatron_spell.dump import dump_batch, load_dumped_batch
from megatron_spell.gen_round import RoleGenerator, run_gen_round
from megatron_spell.metrics import MetricsLogger
from megatron_spell.round_records import QuestionerInput, RoundResult, merge_rounds
from megatron_spell.spell.advantages import with_advantages
from megatron_spell.spell.batching import StepAccumulator, build_final_batch
from megatron_spell.types import DocSet, Role, TrainBatch

log = logging.getLogger(__name__)


WeightBuckets = Iterator[list[tuple[str, Any]]]
"""The policy's weights in Hugging Face names, streamed as size-bounded buckets of (name, tensor)."""


class Policy(Protocol):
    """The Megatron side: one GRPO update on a batch, the weights in Hugging Face names, and the
    moves of its training state off the device and back (no-ops where nothing is configured)."""

    def update(self, batch: TrainBatch) -> dict[str, float]: ...

    def export_weights(self) -> WeightBuckets: ...

    def onload(self) -> None:
        """Everything the update needs back on the device (parameters, grads, optimizer state)."""

    def offload_training_state(self) -> None:
        """Free the spent grads and move the optimizer state to host, as configured."""

    def offload_params(self) -> None:
        """Move the parameters to host, as configured (after the sync has read them)."""


class Engine(RoleGenerator, Protocol):
    """The vLLM side (`rollout.roles.RoleEngine`): role-level generation, the in-place weight load
    (returns the sync metrics), and the memory release while Megatron trains."""

    def load_weights(self, weights: WeightBuckets) -> dict[str, float]: ...

    def sleep(self) -> None: ...

    def wake_up(self, tags: list[str]) -> None: ...


def _gather_one(obj: Any) -> list[Any]:
    """all_gather_object of a single process."""
    return [obj]


def _no_reseed(step: int) -> None:
    """The reseed of a run without sampling state to seed (unit tests)."""


def _no_memory() -> dict[str, float]:
    """The memory reading of a run that has none to report (unit tests)."""
    return {}


def _keep_cache() -> None:
    """The cache release of a run without a device allocator (unit tests)."""


class PhaseLog:
    """The memory at each phase transition of one step: one log line, `memory/<transition>/*`."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read
        self.marks: list[tuple[str, dict[str, float]]] = []

    def mark(self, transition: str) -> None:
        self.marks.append((transition, self.read()))

    def metrics(self) -> dict[str, float]:
        return {f"memory/{t}/{k}": v for t, m in self.marks for k, v in m.items()}

    def line(self, step: int) -> str:
        kinds = sorted({k for _, m in self.marks for k in m})
        head = "/".join(k.removesuffix("_gib") for k in kinds) or "no memory reading"
        return f"step {step} memory GiB ({head}): " + " | ".join(
            f"{t} " + "/".join(f"{m[k]:.2f}" for k in kinds if k in m) for t, m in self.marks
        )


@dataclass
class Collective:
    """What the loop needs from torch.distributed (identity functions on one process)."""

    # this rank's rollout data-parallel group
    rollout_rank: int = 0
    rollout_world: int = 1
    # the rank that writes metrics, dumps and checkpoint metadata
    is_writer: bool = True
    all_gather_object: Callable[[Any], list[Any]] = _gather_one


@dataclass
class Run:
    """Everything one SPELL run holds between steps."""

    config: Config
    corpus: list[DocSet]
    sampler: DomainSampler
    history: HistoryMemory
    curriculum: CurriculumSchedule
    # the rollout engine and the tokenizer's chat template; both None in replay mode (`replay_step`)
    engine: Engine | None
    chat: ChatRenderer | None
    policy: Policy
    metrics: MetricsLogger
    collective: Collective
    # batch assembly (bad cases, verifier groups); same seed and draws on every rank
    rng: random.Random
    # which documents a questioner sees
    doc_rng: random.Random
    step: int = 0
    # seeds the sampling RNGs at the start of each step (vLLM samples in-process from torch's default
    # generator on CPU), so a resumed run draws exactly what an uninterrupted one would
    reseed: Callable[[int], None] = _no_reseed
    # this rank's device memory at a phase transition (memory.device_memory) and the allocator's
    # cache release between phases (memory.empty_cache)
    device_memory: Callable[[], dict[str, float]] = _no_memory
    empty_cache: Callable[[], None] = _keep_cache

    def rollout(self) -> tuple[Engine, ChatRenderer]:
        """The engine and chat renderer of a generating run (ValueError in replay mode)."""
        if self.engine is None or self.chat is None:
            raise ValueError(
                "spell_step needs a rollout engine and a chat renderer; this run was built for "
                "replay (train --replay), which trains with replay_step"
            )
        return self.engine, self.chat


def _log_round(run: Run, acc: StepAccumulator, round_: RoundResult) -> None:
    """One progress line per generation round (a step may take minutes of rounds)."""
    m = round_.metrics
    log.info(
        "step %d round %d: %d questions, %d parsed, %d responder groups; %d/%d groups with reward "
        "variance so far; generate %s",
        run.step + 1,
        acc.num_rounds,
        m.get("questioner/num_prompts", 0),
        round(m.get("questioner/num_prompts", 0) * m.get("questioner/parsed_frac", 0)),
        len(round_.responder_groups),
        acc.num_groups,
        run.config.spell.train_batch_size,
        ", ".join(f"{role} {sec:.1f}s" for role, sec in round_.seconds.items()),
    )


def spell_step(run: Run) -> dict[str, float]:
    """One optimizer step of SPELL; returns the step's scalars (also logged)."""
    t0 = time.perf_counter()
    cfg, metrics = run.config, run.metrics
    engine, chat = run.rollout()
    run.reseed(run.step)
    acc = StepAccumulator()
    rounds: list[RoundResult] = []
    while True:
        with metrics.timer("generate"):
            inputs = questioner_inputs(run)
            mine = inputs[run.collective.rollout_rank :: run.collective.rollout_world]
            local = run_gen_round(
                mine,
                engine,
                chat,
                cfg.spell,
                uid_prefix=f"s{run.step}g{acc.num_rounds}p{run.collective.rollout_rank}",
                max_response_tokens=cfg.rollout.max_response_length,
            )
            round_ = merge_rounds(run.collective.all_gather_object(local))
        with metrics.timer("score"):
            remembered = remember(run.history, round_)
            acc.add_round(round_.questioner, round_.responder_groups, round_.verifier_candidates)
        rounds.append(round_)
        metrics.add({"data/history_added": remembered})
        _log_round(run, acc, round_)
        if acc.is_ready(cfg.spell):
            break
        if (
            acc.num_rounds >= cfg.spell.max_num_gen_batches
            and cfg.spell.on_batch_shortfall != "error"
        ):
            metrics.add({"batch/shortfall": cfg.spell.train_batch_size - acc.num_groups})
            break
        acc.check_progress(cfg.spell)  # BatchNotReadyError naming the knobs
    batch = final_batch(run, acc)
    train_metrics, sync_metrics = update_and_sync(run, engine, batch)
    if cfg.logging.dump_rollouts and run.collective.is_writer:
        records = [rec for r in rounds for rec in r.records]
        dump_batch(batch, records, Path(cfg.run_dir) / "rollouts", run.step)
    metrics.add(merge_rounds(rounds).metrics)
    for role in Role:  # generate wall time per role, summed over the rounds
        metrics.add(
            {f"timing/generate_{role.value}_s": sum(r.seconds.get(role.value, 0.0) for r in rounds)}
        )
    metrics.add(batch_metrics(batch, acc))
    metrics.add(train_metrics, prefix="train")
    metrics.add(sync_metrics, prefix="sync")
    metrics.add({"data/history_size": len(run.history), "timing/step_s": time.perf_counter() - t0})
    run.step += 1
    return metrics.flush(run.step)


def update_and_sync(run: Run, engine: Engine, batch: TrainBatch) -> tuple[dict, dict]:
    """The update and the weight sync on a device that vLLM and Megatron share, in turn
    (docs/architecture.md "One step on one device"; verl `engine_workers.py` / `megatron_workers.py`:
    rollout asleep before the update, weights woken before the sync, KV cache after it)."""
    metrics, phases = run.metrics, PhaseLog(run.device_memory)
    phases.mark("generated")
    engine.sleep()  # KV cache freed; at rollout.sleep_level 2 the weights too
    run.empty_cache()
    phases.mark("rollout_asleep")
    run.policy.onload()  # what the last step moved to host comes back
    phases.mark("policy_onloaded")
    with metrics.timer("train"):
        train_metrics = run.policy.update(batch) if batch.trajectories else {"skipped_empty": 1.0}
    phases.mark("updated")
    run.policy.offload_training_state()  # grads freed; optimizer state to host (as configured)
    run.empty_cache()
    phases.mark("training_state_offloaded")
    engine.wake_up(["weights"])
    phases.mark("weights_awake")
    with metrics.timer("sync"):
        sync_metrics = engine.load_weights(run.policy.export_weights())
    phases.mark("synced")
    run.policy.offload_params()  # the parameters to host (as configured)
    run.empty_cache()
    phases.mark("params_offloaded")
    engine.wake_up(["kv_cache"])
    phases.mark("kv_cache_awake")
    log.info(phases.line(run.step + 1))
    metrics.add(phases.metrics())
    return train_metrics, sync_metrics


def start_rollout(run: Run) -> dict[str, float]:
    """Before the first step (and after a resume): the policy's weights into vLLM, which started with
    dummy weights, then the training state off the device for generation. The sync metrics."""
    engine, _chat = run.rollout()
    sync = engine.load_weights(run.policy.export_weights())
    run.policy.offload_training_state()
    run.policy.offload_params()
    run.empty_cache()
    return sync


def questioner_inputs(run: Run) -> list[QuestionerInput]:
    """The next round's questioner prompts: rows from the domain sampler, documents from memory + curriculum."""
    cfg = run.config.data
    max_docs, max_tokens = run.curriculum.limits(run.step)
    inputs = []
    for task, row in run.sampler.next_round():
        docset = run.corpus[row]
        history = (
            run.history.entries(task, docset.question_id, data_source=docset.data_source)
            if cfg.use_history
            else []
        )
        n_new = draw_num_new_docs(cfg.n_docs, docset.data_source, run.doc_rng)
        evidence = select_documents(
            len(docset.paragraphs),
            n_new,
            history,
            run.doc_rng,
            max_docs=max_docs,
            max_tokens=max_tokens,
            doc_tokens=[len(p) // 4 for p in docset.paragraphs] if max_tokens else None,
        )
        inputs.append(QuestionerInput(task, docset, tuple(evidence), tuple(history)))
    return inputs


def remember(history: HistoryMemory, round_: RoundResult) -> int:
    """Store the round's questions that pass the memory gate (docs/spell-algorithm.md §4.1); returns
    how many were stored."""
    return sum(
        history.record(c.task, c.question_id, c.entry, c.success_rate, data_source=c.data_source)
        for c in round_.history
    )


def final_batch(run: Run, acc: StepAccumulator) -> TrainBatch:
    """docs/spell-algorithm.md §1.6 batch (or, on an allowed shortfall, the groups there are) with
    Eq. 8-9 advantages."""
    spell = run.config.spell
    if not acc.is_ready(spell):
        spell = replace(spell, train_batch_size=max(acc.num_groups, 1))
        if acc.num_groups == 0:
            return TrainBatch(responder=(), questioner=(), verifier=())
    # dp_size=1: nothing is cut to a DP multiple; the update balances any count over its DP ranks
    # (mcore/packing.pack_batch) with global-token loss weights (see spell/batching.py)
    batch = build_final_batch(acc, spell, run.rng, dp_size=1)
    return with_advantages(batch, questioner_group=run.config.spell.questioner_group)


def batch_metrics(batch: TrainBatch, acc: StepAccumulator) -> dict[str, float]:
    q = batch.questioner
    good = [t for t in q if t.case is None]
    total_cases = sum(acc.case_counts.values())
    out = {
        "batch/num_responder": len(batch.responder),
        "batch/num_questioner": len(q),
        "batch/num_verifier": len(batch.verifier),
        "batch/num_gen_rounds": acc.num_rounds,
        "questioner/reward_mean": sum(t.reward for t in good) / len(good) if good else 0.0,
        "verifier/reward_mean": (
            sum(t.reward for t in batch.verifier) / len(batch.verifier) if batch.verifier else 0.0
        ),
        "rollout/generated_tokens": sum(len(t.completion.token_ids) for t in batch.trajectories),
    }
    if total_cases:
        out["questioner/zero_variance_frac"] = acc.case_counts.get("zero_variance", 0) / total_cases
    return out


def replay_step(run: Run, replay_dir: Path) -> dict[str, float]:
    """One update from a dumped batch, without generation or weight sync (`train --replay DIR`)."""
    t0 = time.perf_counter()
    batch = load_dumped_batch(replay_dir, run.step)
    run.policy.onload()  # a checkpoint's save may have freed the grads
    with run.metrics.timer("train"):
        run.metrics.add(run.policy.update(batch), prefix="train")
    run.metrics.add({"batch/num_trajectories": len(batch.trajectories)})
    run.metrics.add({"timing/step_s": time.perf_counter() - t0})
    run.step += 1
    return run.metrics.flush(run.step)
