"""Accumulation, dynamic sampling, bad-case and verifier sampling, final batch sizes
(docs/spell-algorithm.md §1.5-§1.6)."""

import random

import pytest

from megatron_spell.config import SpellConfig
from megatron_spell.spell.batching import (
    BatchNotReadyError,
    StepAccumulator,
    build_final_batch,
    filter_groups,
    sample_bad_cases,
    sample_verifier_groups,
    truncate_to_multiple,
)
from megatron_spell.spell.rewards import questioner_reward
from megatron_spell.types import CaseType, Role, Task
from tests.unit.spell.factories import questioner_sample, responder_group, verifier_group

TASKS = list(Task)


def make_round(acc, rnd, num_questions, rng, *, num_candidates=20, n=8):
    """One synthetic gen round: every 3rd question unsolved (zero variance), every 5th bad_format."""
    samples, groups = [], []
    for i in range(num_questions):
        uid, task = f"r{rnd}q{i}", TASKS[i % 3]
        if i % 5 == 4:
            samples.append(questioner_sample(uid, task, CaseType.BAD_FORMAT))
            continue
        if i % 5 == 3:
            samples.append(questioner_sample(uid, task, CaseType.BAD_GROUND))
            continue
        samples.append(questioner_sample(uid, task))
        k = 0 if i % 3 == 2 else rng.randint(1, n - 1)
        groups.append(responder_group(uid, task, [1.0] * k + [0.0] * (n - k)))
    cands = [
        verifier_group(f"v{rnd}_{j}", TASKS[j % 3], [1.0] * 6 + [0.0] * 2)
        for j in range(num_candidates)
    ]
    return acc.add_round(samples, groups, cands)


def test_filter_groups():
    groups = [
        responder_group("a", Task.DOC_MC, [1, 0, 1]),
        responder_group("b", Task.DOC_MC, [0, 0, 0]),
        responder_group("c", Task.DOC_MC, [1, 1, 1]),
        responder_group(
            "d", Task.DOC_MC, [0.5, 0.5]
        ),  # std 0, mean in (0,1): dropped, not a bad case
    ]
    kept, zero = filter_groups(groups)
    assert [g.uid for g in kept] == ["a"] and zero == ["b", "c"]


def test_reference_sizes_1024_128_128_128():
    """Golden: 128 groups x 8, 128 good + <=128 bad questioner, 16 verifier groups x 8 = 1408."""
    rng = random.Random(0)
    config = SpellConfig()
    acc = StepAccumulator()
    rounds = 0
    while not acc.is_ready(config):
        make_round(acc, rounds, 120, rng)
        rounds += 1
        acc.check_progress(config)
    batch = build_final_batch(acc, config, rng, dp_size=8)
    assert len(batch.responder) == 1024
    good = [t for t in batch.questioner if t.case is None]
    bad = [t for t in batch.questioner if t.case is not None]
    assert len(good) == 128 and len(bad) == 128
    assert len(batch.verifier) == 128
    assert len(batch.trajectories) == 1408
    # responder part = the first 128 groups in accumulation order, contiguous blocks of 8
    uids = [t.uid for t in batch.responder]
    assert uids[::8] == [g.uid for g in acc.responder_groups[:128]]
    assert all(len(set(uids[i : i + 8])) == 1 for i in range(0, 1024, 8))
    # good questioner samples are exactly the kept groups' questions, with Eq. 7 rewards
    group_by_uid = {g.uid: g for g in acc.responder_groups}
    assert {t.uid for t in good} == set(uids)
    for t in good:
        x = sum(group_by_uid[t.uid].rewards) / 8
        assert t.reward == pytest.approx(questioner_reward(x)) and t.role is Role.QUESTIONER
    values = {CaseType.BAD_FORMAT: -1.0, CaseType.BAD_GROUND: -0.5, CaseType.ZERO_VARIANCE: 0.0}
    assert all(t.reward == values[t.case] for t in bad)
    assert {t.case for t in bad} <= set(values)
    # zero-variance questions were marked during accumulation
    assert any(s.case is CaseType.ZERO_VARIANCE for s in acc.questioner.values())


def test_bad_case_carry_over():
    """docs/spell-algorithm.md §1.6 carry-over; §9 item 16: ratio 0 disables bad cases, 1 = as many
    bad as good."""
    rng = random.Random(1)
    good = {Task.DOC_MC: 10, Task.DOCMATH_QA: 5}
    pools = {
        Task.DOC_MC: list("abc"),
        Task.DOCMATH_QA: list(range(20)),
        Task.DOC_GENERAL_QA: list("xyz"),
    }
    chosen = sample_bad_cases(good, pools, 1.0, rng)
    # doc_mc wants 10, has 3 -> carry 7; docmath wants 5 + 7 = 12; general (no good) gets nothing left
    assert sorted(c for c in chosen if isinstance(c, str)) == ["a", "b", "c"]
    assert len([c for c in chosen if isinstance(c, int)]) == 12
    # a shortfall still open after the good tasks is filled from tasks with only bad cases
    chosen = sample_bad_cases(
        {Task.DOC_MC: 4}, {Task.DOC_MC: ["a"], Task.DOC_GENERAL_QA: list("xyz")}, 1.0, rng
    )
    assert len(chosen) == 4
    assert sample_bad_cases(good, pools, 0.0, rng) == []  # §9 item 16: 0 disables bad cases
    assert len(sample_bad_cases(good, pools, 0.5, rng)) == 5 + 2  # int(0.5*10) + int(0.5*5)


def test_bad_case_sampling_is_seeded():
    pools = {Task.DOC_MC: list(range(100))}
    a = sample_bad_cases({Task.DOC_MC: 10}, pools, 1.0, random.Random(3))
    b = sample_bad_cases({Task.DOC_MC: 10}, pools, 1.0, random.Random(3))
    assert a == b and len(set(a)) == 10


def test_verifier_sampling():
    cands = [verifier_group(f"v{i}", Task.DOC_MC, [1, 0]) for i in range(20)]
    assert len(sample_verifier_groups(cands, 1024, 0.125, 8, random.Random(0))) == 16
    assert sample_verifier_groups(cands[:15], 1024, 0.125, 8, random.Random(0)) == []  # too few
    assert sample_verifier_groups(cands, 1024, 0.0, 8, random.Random(0)) == []


def _one_round(n: int, num_verifier_groups: int) -> StepAccumulator:
    """An accumulator holding one doc_mc round: n parsed and n bad_format questioner samples, the n
    responder groups of the parsed ones and `num_verifier_groups` verifier groups."""
    acc = StepAccumulator()
    acc.add_round(
        [questioner_sample(f"q{i}", Task.DOC_MC) for i in range(n)]
        + [questioner_sample(f"b{i}", Task.DOC_MC, CaseType.BAD_FORMAT) for i in range(n)],
        [responder_group(f"q{i}", Task.DOC_MC, [1, 0]) for i in range(n)],
        [verifier_group(f"v{i}", Task.DOC_MC, [1, 0]) for i in range(num_verifier_groups)],
    )
    return acc


def test_world_size_truncation():
    """docs/spell-algorithm.md D8: bad and verifier parts are cut to a multiple of the data-parallel
    size."""
    assert truncate_to_multiple(list(range(13)), 4) == list(range(12))
    rng = random.Random(0)
    config = SpellConfig(train_batch_size=4, responder_n=2, verifier_n=2, verifier_update_ratio=0.5)
    acc = _one_round(4, num_verifier_groups=5)
    batch = build_final_batch(acc, config, rng, dp_size=3)
    assert len(batch.responder) == 8
    assert len([t for t in batch.questioner if t.case]) == 3  # 4 bad cut to a multiple of 3
    assert len(batch.verifier) == 3  # 2 groups x 2 = 4 cut to 3


def test_section9_empty_rounds_do_not_crash_and_error_names_knobs():
    """Item 14: a round where no questioner output parses is empty; after max rounds a clear error."""
    config = SpellConfig(max_num_gen_batches=3)
    acc = StepAccumulator()
    for _ in range(2):
        assert acc.add_round(None, None, None) == []
        acc.check_progress(config)
    acc.add_round([questioner_sample("x", Task.DOC_MC, CaseType.BAD_FORMAT)], [], [])
    with pytest.raises(BatchNotReadyError) as info:
        acc.check_progress(config)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for knob in (
        "spell.max_num_gen_batches=3",
        "spell.train_batch_size=128",
        "data.gen_batch_size",
        "bad_format=1",
    ):
        assert knob in message
    with pytest.raises(BatchNotReadyError):
        build_final_batch(acc, config, random.Random(0), dp_size=1)


def test_update_flags_and_reset():
    rng = random.Random(0)
    config = SpellConfig(train_batch_size=2, update_questioner=False, update_verifier=False)
    acc = StepAccumulator()
    acc.add_round([], [responder_group(f"g{i}", Task.DOC_MC, [1, 0]) for i in range(3)], [])
    batch = build_final_batch(acc, config, rng, dp_size=1)
    assert len(batch.responder) == 4 and batch.questioner == () and batch.verifier == ()
    acc.reset()
    assert acc.num_groups == 0 and acc.num_rounds == 0


def test_validation_lives_in_spell_config():
    with pytest.raises(ValueError, match="questioner_bad_case_ratio"):
        SpellConfig(questioner_bad_case_ratio=-1)
    with pytest.raises(ValueError, match="questioner_reward='linear': must be one of"):
        SpellConfig(questioner_reward="linear")
    with pytest.raises(ValueError, match="verifier_update_ratio"):
        SpellConfig(verifier_update_ratio=1.5)
    acc = StepAccumulator()
    acc.add_round([], [responder_group("g", Task.DOC_MC, [1, 0])], [])
    with pytest.raises(ValueError, match="dp_size=0"):
        build_final_batch(acc, SpellConfig(train_batch_size=1), random.Random(0), dp_size=0)


def test_dp_size_one_keeps_every_trajectory_and_the_update_takes_any_count():
    """Why the loop passes dp_size=1 (docs/spell-algorithm.md D8): nothing needs cutting.

    The reference cuts the bad-case and verifier parts to a multiple of its DP size so that verl
    can split the batch into equal shares. Here the batch keeps its odd counts, and the Megatron
    update's packing puts every trajectory on exactly one of 4 DP ranks, with loss weights summing to
    1 over the global batch: no rank is short of work and no trajectory is weighted twice.
    """
    from megatron_spell.config import TrainConfig
    from megatron_spell.mcore.loss import token_weights
    from megatron_spell.mcore.packing import TrainSample, pack_batch

    config = SpellConfig(train_batch_size=3, responder_n=2, verifier_n=2, verifier_update_ratio=1.0)
    acc = _one_round(3, num_verifier_groups=3)
    cut = build_final_batch(acc, config, random.Random(0), dp_size=4)
    assert (len(cut.responder), len(cut.questioner), len(cut.verifier)) == (6, 3, 4)
    batch = build_final_batch(acc, config, random.Random(0), dp_size=1)
    assert (len(batch.responder), len(batch.questioner), len(batch.verifier)) == (6, 6, 6)
    samples = [
        TrainSample(
            prompt_ids=list(t.prompt_ids),
            response_ids=list(t.completion.token_ids),
            advantage=1.0,
            role=t.role.value,
        )
        for t in batch.trajectories
    ]
    dp = 4
    seen, total = [], 0.0
    for rank in range(dp):
        packed = pack_batch(samples, max_tokens_per_microbatch=64, dp_size=dp, dp_rank=rank)
        assert any(mb.sample_ids for mb in packed.micro_batches)
        for mb in packed.micro_batches:
            seen += mb.sample_ids
            w = token_weights(
                mb.loss_mask,
                mb.seq_num_loss_tokens,
                mode=TrainConfig().loss_agg_mode,
                global_num_loss_tokens=packed.global_num_loss_tokens,
                global_num_sequences=packed.global_num_sequences,
            )
            total += float(w.sum())
    assert sorted(seen) == list(range(len(samples)))
    assert total == pytest.approx(1.0)
