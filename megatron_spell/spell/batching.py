"""Accumulation over generation rounds and assembly of the final training batch
(docs/spell-algorithm.md §1.5-§1.6).

One step = one optimizer update, built from one or more gen rounds:

* `filter_groups` (dynamic sampling): keep responder groups whose rewards are not all equal (population std
  > 0); groups with std 0 and mean outside (0, 1) make their question a zero_variance bad case.
* `StepAccumulator.add_round` pools the round's questioner samples (with their cases), the surviving responder
  groups in order, and the verifier training candidates. `is_ready` is true once `train_batch_size` distinct
  groups are pooled; `check_progress` raises `BatchNotReadyError` after `max_num_gen_batches` rounds without.
* `build_final_batch`: the first `train_batch_size` groups (x `responder_n` trajectories); one good questioner
  sample per kept group, rewarded with Eq. 7 of its group's mean reward; bad cases sampled per task with
  carry-over (`sample_bad_cases`); `int(num_responder_traj * verifier_update_ratio / verifier_n)` verifier
  groups sampled from the candidates (none if there are fewer). Bad and verifier parts are cut to a multiple of
  `dp_size`. Reference sizes: 1024 + 128 + <=128 + 128. The sizes come from the run's `spell` section
  (`config.SpellConfig`), which also validates them.

Deliberate decisions (§9):

* D11: a round in which no questioner output parses is an empty round, not a crash (`add_round` accepts
  empty or None parts). Running out of rounds raises `BatchNotReadyError` (a RuntimeError) whose message
  names the knobs to change and the case counts of the step, instead of a bare ValueError.
* D8: `dp_size` is an explicit argument. The reference cuts to a multiple of its data-parallel world
  size (`n_gpus / ulysses_sp`) because verl's dispatch splits the batch into equal shares. The loop passes
  1: the Megatron update balances any number of sequences over its DP ranks (`mcore/packing.pack_batch`)
  and normalises the loss by global token counts, so no trajectory has to be dropped.
* §9 item 16: `questioner_bad_case_ratio` is "bad cases per good case": 0 disables bad cases, 1
  allows as many bad as good (the reference script comment "set to 1 to ablate" is wrong).
* Bad-case carry-over visits tasks by descending good count (ties by task name, for determinism) and then the
  tasks that only have bad cases, so a shortfall can still be filled from them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TypeVar

from megatron_spell.config import SpellConfig
from megatron_spell.spell.rewards import bad_case_reward, questioner_reward
from megatron_spell.types import (
    CaseType,
    QuestionerSample,
    ResponderGroup,
    Task,
    TrainBatch,
    Trajectory,
    VerifierGroup,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
BAD_CASES = (CaseType.BAD_FORMAT, CaseType.BAD_GROUND, CaseType.ZERO_VARIANCE)


class BatchNotReadyError(RuntimeError):
    """No training batch formed within the allowed number of generation rounds."""


def _has_variance(rewards: Sequence[float]) -> bool:
    return len(set(float(r) for r in rewards)) > 1


def filter_groups(
    groups: Iterable[ResponderGroup],
) -> tuple[list[ResponderGroup], list[str]]:
    """Dynamic sampling: (groups with reward std > 0, uids of zero-variance groups with mean not in (0,1))."""
    kept, zero_variance = [], []
    for group in groups:
        rewards = group.rewards
        if rewards and _has_variance(rewards):
            kept.append(group)
            continue
        mean = sum(rewards) / len(rewards) if rewards else 0.0
        if not 0.0 < mean < 1.0:
            zero_variance.append(group.uid)
    return kept, zero_variance


class StepAccumulator:
    """Everything pooled over the gen rounds of one step; `reset` after each update
    (`SPELL/verl/verl/trainer/ppo/ray_spell_trainer.py:430-455`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_rounds = 0
        self.responder_groups: list[ResponderGroup] = []
        self.questioner: dict[str, QuestionerSample] = {}
        self.verifier_candidates: list[VerifierGroup] = []
        self.case_counts: Counter[str] = Counter()

    @property
    def num_groups(self) -> int:
        return len({g.uid for g in self.responder_groups})

    def add_round(
        self,
        questioner: Sequence[QuestionerSample] | None,
        responder_groups: Sequence[ResponderGroup] | None,
        verifier_candidates: Sequence[VerifierGroup] | None = None,
    ) -> list[ResponderGroup]:
        """Pool one gen round; applies `filter_groups` and marks zero-variance questions. Returns kept groups.

        Empty or None parts are allowed (a round in which nothing parsed, docs/spell-algorithm.md
        D11).
        """
        self.num_rounds += 1
        kept, zero_variance = filter_groups(responder_groups or ())
        zero = set(zero_variance)
        for sample in questioner or ():
            if sample.case is None and sample.uid in zero:
                sample = dataclasses.replace(sample, case=CaseType.ZERO_VARIANCE)
            self.questioner[sample.uid] = sample
            self.case_counts[sample.case.value if sample.case else "good"] += 1
        self.responder_groups.extend(kept)
        self.verifier_candidates.extend(verifier_candidates or ())
        return kept

    def is_ready(self, config: SpellConfig) -> bool:
        return self.num_groups >= config.train_batch_size

    def check_progress(self, config: SpellConfig) -> None:
        """Raise `BatchNotReadyError` when `max_num_gen_batches` rounds did not yield a batch."""
        if self.is_ready(config) or self.num_rounds < config.max_num_gen_batches:
            return
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.case_counts.items())) or "none"
        raise BatchNotReadyError(
            f"only {self.num_groups} of spell.train_batch_size={config.train_batch_size} responder groups "
            f"with reward variance after spell.max_num_gen_batches={config.max_num_gen_batches} gen rounds "
            f"(questioner outputs by case: {counts}). Raise spell.max_num_gen_batches or "
            "data.gen_batch_size, lower spell.train_batch_size, or check the questioner prompts/model "
            "(many bad_format means its output does not parse)."
        )


def truncate_to_multiple(items: Sequence[T], k: int) -> list[T]:
    """The first `len(items) - len(items) % k` items."""
    return list(items[: len(items) - len(items) % k])


def sample_bad_cases(
    good_counts: dict[Task, int],
    bad_pools: dict[Task, Sequence[T]],
    ratio: float,
    rng: random.Random,
) -> list[T]:
    """Per task, `int(ratio * good) + carry` bad cases uniformly without replacement
    (`SPELL/verl/verl/trainer/ppo/ray_spell_trainer.py:558-638`)."""
    order = sorted(good_counts, key=lambda t: (-good_counts[t], t.value))
    order += sorted((t for t in bad_pools if t not in good_counts), key=lambda t: t.value)
    chosen: list[T] = []
    carry = 0
    for task in order:
        want = int(ratio * good_counts.get(task, 0)) + carry
        pool = list(bad_pools.get(task, ()))
        take = min(want, len(pool))
        chosen.extend(rng.sample(pool, take))
        carry = want - take
    return chosen


def sample_verifier_groups(
    candidates: Sequence[VerifierGroup],
    num_responder_trajectories: int,
    update_ratio: float,
    verifier_n: int,
    rng: random.Random,
) -> list[VerifierGroup]:
    """`int(num_responder_trajectories * update_ratio / verifier_n)` groups, or none if too few candidates."""
    wanted = int(num_responder_trajectories * update_ratio / verifier_n)
    if wanted <= 0 or len(candidates) < wanted:
        return []
    return rng.sample(list(candidates), wanted)


def _questioner_part(
    acc: StepAccumulator,
    groups: Sequence[ResponderGroup],
    config: SpellConfig,
    rng: random.Random,
    dp_size: int,
) -> tuple[list[Trajectory], list[Trajectory]]:
    good: list[Trajectory] = []
    good_counts: Counter[Task] = Counter()
    for group in groups:
        sample = acc.questioner.get(group.uid)
        if sample is None:
            logger.warning("responder group %s has no questioner sample; skipped", group.uid)
            continue
        x = sum(group.rewards) / len(group.rewards)
        reward = questioner_reward(x, config.questioner_reward)
        good.append(dataclasses.replace(sample.trajectory, reward=reward, case=None))
        good_counts[sample.task] += 1
    pools: dict[Task, list[QuestionerSample]] = {}
    for sample in acc.questioner.values():
        if sample.case in BAD_CASES:
            pools.setdefault(sample.task, []).append(sample)
    bad_samples = sample_bad_cases(dict(good_counts), pools, config.questioner_bad_case_ratio, rng)
    bad = [
        dataclasses.replace(s.trajectory, reward=bad_case_reward(s.case), case=s.case)
        for s in bad_samples
        if s.case is not None
    ]
    return good, truncate_to_multiple(bad, dp_size)


def build_final_batch(
    acc: StepAccumulator, config: SpellConfig, rng: random.Random, *, dp_size: int
) -> TrainBatch:
    """Assemble the step's batch (docs/spell-algorithm.md §1.6). Raises BatchNotReadyError if too
    few groups are pooled.

    `dp_size`: the bad-case and verifier parts are cut to a multiple of it (the reference's
    data-parallel world size; see the module docstring for the value the loop passes).
    """
    if dp_size < 1:
        raise ValueError(
            f"build_final_batch dp_size={dp_size}: must be >= 1 (the data-parallel size)"
        )
    if not acc.is_ready(config):
        raise BatchNotReadyError(
            f"build_final_batch needs spell.train_batch_size={config.train_batch_size} groups, "
            f"have {acc.num_groups}"
        )
    seen: set[str] = set()
    groups: list[ResponderGroup] = []
    for group in acc.responder_groups:
        if group.uid not in seen and len(groups) < config.train_batch_size:
            seen.add(group.uid)
            groups.append(group)
    odd = [g.uid for g in groups if len(g.trajectories) != config.responder_n]
    if odd:
        logger.warning(
            "%d responder groups do not have spell.responder_n=%d responses (e.g. %s)",
            len(odd),
            config.responder_n,
            odd[0],
        )
    responder = [t for g in groups for t in g.trajectories]
    questioner: list[Trajectory] = []
    if config.update_questioner:
        good, bad = _questioner_part(acc, groups, config, rng, dp_size)
        questioner = good + bad
    verifier: list[Trajectory] = []
    if config.update_verifier:
        chosen = sample_verifier_groups(
            acc.verifier_candidates,
            len(responder),
            config.verifier_update_ratio,
            config.verifier_n,
            rng,
        )
        verifier = truncate_to_multiple([t for g in chosen for t in g.trajectories], dp_size)
    return TrainBatch(
        responder=tuple(responder), questioner=tuple(questioner), verifier=tuple(verifier)
    )
