"""One SPELL step as straight-line code (spec section 1.1): the file to read next to the paper.

    repeat (one gen round):
        questioner prompts  <- domain sampler + history memory + document curriculum      (spec 4)
        round               <- questioner -> grounding filter -> responder x n -> verifier x n   (gen_round)
        history memory      <- questions whose success passes the gate                   (spec 4.1)
        accumulate; dynamic-sampling filter                                              (spec 1.5)
    until enough responder groups (or an error after spell.max_num_gen_batches rounds)
    final batch -> advantages (Eq. 8-9) -> one policy update on all roles (Megatron)     (spec 1.6-1.7, 5)
    weights -> vLLM; metrics; checkpoint

The model, the engine and the collectives are injected (`train.py` builds them), so this file imports neither
Megatron nor vLLM. Every rank runs the same code (SPMD): each rollout group generates its share of the round's
questioner prompts, the round results are gathered everywhere, and from then on every rank holds the same
accumulator, memory and batch, and trains its data-parallel share of it.

Deviation (spec section 9 item 14): with `spell.on_batch_shortfall="train_available"` a step that still lacks
groups after `spell.max_num_gen_batches` rounds trains on what it has (logged as `batch/shortfall`) instead of
aborting the run; the default "error" keeps the reference's behaviour with a message that names the knobs.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from megatron_spell.config import Config
from megatron_spell.data.curriculum import CurriculumSchedule, draw_num_new_docs, select_documents
from megatron_spell.data.history import HistoryMemory
from megatron_spell.data.sampler import DomainSampler
from megatron_spell.gen_round import (
    ChatRenderer,
    Generator,
    QuestionerInput,
    RoundResult,
    merge_rounds,
    run_gen_round,
)
from megatron_spell.metrics import MetricsLogger
from megatron_spell.spell.advantages import with_advantages
from megatron_spell.spell.batching import StepAccumulator, build_final_batch
from megatron_spell.types import CaseType, Completion, DocSet, Role, Task, TrainBatch, Trajectory

log = logging.getLogger(__name__)


class Policy(Protocol):
    """The Megatron side: one GRPO update on a batch, and the weights in Hugging Face names."""

    def update(self, batch: TrainBatch) -> dict[str, float]: ...

    def export_weights(self) -> Iterator[tuple[str, Any]]: ...


class Engine(Generator, Protocol):
    """The vLLM side: generation plus in-place weight loading."""

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> dict[str, float]: ...


@dataclass
class Collective:
    """What the loop needs from torch.distributed (identity functions on one process)."""

    rollout_rank: int = 0  # this rank's rollout data-parallel group
    rollout_world: int = 1
    is_writer: bool = True  # the rank that writes metrics, dumps and checkpoint metadata
    all_gather_object: Callable[[Any], list[Any]] = lambda obj: [obj]


@dataclass
class Run:
    """Everything one SPELL run holds between steps."""

    config: Config
    corpus: list[DocSet]
    sampler: DomainSampler
    history: HistoryMemory
    curriculum: CurriculumSchedule
    engine: Engine | None  # None in replay mode
    chat: ChatRenderer | None
    policy: Policy
    metrics: MetricsLogger
    collective: Collective
    rng: (
        random.Random
    )  # batch assembly (bad cases, verifier groups); same seed and draws on every rank
    doc_rng: random.Random  # which documents a questioner sees
    step: int = 0
    # seeds the sampling RNGs at the start of each step (vLLM samples in-process from torch's default
    # generator on CPU), so a resumed run draws exactly what an uninterrupted one would
    reseed: Callable[[int], None] = lambda step: None


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
    run.reseed(run.step)
    acc = StepAccumulator()
    rounds: list[RoundResult] = []
    while True:
        with metrics.timer("generate"):
            inputs = questioner_inputs(run)
            mine = inputs[run.collective.rollout_rank :: run.collective.rollout_world]
            local = run_gen_round(
                mine,
                run.engine,
                run.chat,
                cfg.spell,
                uid_prefix=f"s{run.step}g{acc.num_rounds}p{run.collective.rollout_rank}",
                max_response_tokens=cfg.rollout.max_response_length,
                structured=cfg.rollout.structured_outputs,
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
    with metrics.timer("train"):
        train_metrics = run.policy.update(batch) if batch.trajectories else {"skipped_empty": 1.0}
    with metrics.timer("sync"):
        sync_metrics = run.engine.load_weights(run.policy.export_weights()) if run.engine else {}
    if cfg.logging.dump_rollouts and run.collective.is_writer:
        dump_batch(batch, rounds, Path(cfg.run_dir) / "rollouts", run.step)
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


def questioner_inputs(run: Run) -> list[QuestionerInput]:
    """The next round's questioner prompts: rows from the domain sampler, documents from memory + curriculum."""
    cfg = run.config.data
    max_docs, max_tokens = run.curriculum.limits(run.step)
    inputs = []
    for task, row in run.sampler.next_round():
        docset = run.corpus[row]
        history = run.history.entries(task, docset.question_id) if cfg.use_history else []
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
    """Store the round's questions that pass the memory gate (spec 4.1); returns how many were stored."""
    return sum(
        history.record(c.task, c.question_id, c.entry, c.success_rate) for c in round_.history
    )


def final_batch(run: Run, acc: StepAccumulator) -> TrainBatch:
    """Spec 1.6 batch (or, on an allowed shortfall, the groups there are) with Eq. 8-9 advantages."""
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


def dump_batch(batch: TrainBatch, rounds: list[RoundResult], out_dir: Path, step: int) -> Path:
    """Write the step's training batch (replayable) and per-question rollout records as JSONL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:08d}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for t in batch.trajectories:
            fh.write(json.dumps(trajectory_to_json(t)) + "\n")
    with open(out_dir / f"step_{step:08d}_rounds.jsonl", "w", encoding="utf-8") as fh:
        for r in rounds:
            for rec in r.records:
                fh.write(json.dumps(rec) + "\n")
    return path


def trajectory_to_json(t) -> dict[str, Any]:
    return {
        "role": t.role.value,
        "task": t.task.value,
        "uid": t.uid,
        "case": t.case.value if t.case else None,
        "reward": t.reward,
        "advantage": t.advantage,
        "prompt_ids": list(t.prompt_ids),
        "response_ids": list(t.completion.token_ids),
        "logprobs": list(t.completion.logprobs),
        "text": t.completion.text,
        "finish_reason": t.completion.finish_reason,
    }


def trajectory_from_json(d: dict[str, Any]) -> Trajectory:
    """Inverse of `trajectory_to_json` (a dumped trajectory, with its reward and advantage)."""
    return Trajectory(
        role=Role(d["role"]),
        task=Task(d["task"]),
        uid=str(d["uid"]),
        prompt_ids=tuple(int(i) for i in d["prompt_ids"]),
        completion=Completion(
            token_ids=tuple(int(i) for i in d["response_ids"]),
            text=str(d.get("text", "")),
            logprobs=tuple(float(x) for x in d["logprobs"]),
            finish_reason=str(d.get("finish_reason", "stop")),
        ),
        reward=float(d["reward"]),
        case=CaseType(d["case"]) if d.get("case") else None,
        advantage=float(d["advantage"]),
    )


def load_dumped_batch(replay_dir: Path, step: int) -> TrainBatch:
    """The training batch that `dump_batch` wrote for `step` (ValueError names a bad line)."""
    path = Path(replay_dir) / f"step_{step:08d}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"--replay: {path} does not exist (dump rollouts with logging.dump_rollouts=true)"
        )
    parts: dict[Role, list[Trajectory]] = {r: [] for r in Role}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                t = trajectory_from_json(json.loads(line))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a dumped trajectory ({exc})") from exc
            parts[t.role].append(t)
    return TrainBatch(
        responder=tuple(parts[Role.RESPONDER]),
        questioner=tuple(parts[Role.QUESTIONER]),
        verifier=tuple(parts[Role.VERIFIER]),
    )


def replay_step(run: Run, replay_dir: Path) -> dict[str, float]:
    """One update from a dumped batch, without generation or weight sync (`train --replay DIR`)."""
    t0 = time.perf_counter()
    batch = load_dumped_batch(replay_dir, run.step)
    with run.metrics.timer("train"):
        run.metrics.add(run.policy.update(batch), prefix="train")
    run.metrics.add({"batch/num_trajectories": len(batch.trajectories)})
    run.metrics.add({"timing/step_s": time.perf_counter() - t0})
    run.step += 1
    return run.metrics.flush(run.step)
