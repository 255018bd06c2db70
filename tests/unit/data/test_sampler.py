"""Task split and the domain sampler (docs/spell-algorithm.md §2, §4.3): counts, reshuffle, seeding,
resume (D12)."""

import json
import random
from collections import Counter

import pytest

from megatron_spell.data.sampler import DomainSampler, assign_tasks, round_counts
from megatron_spell.types import DocSet, Task

GQ, MC, DM = Task.DOC_GENERAL_QA, Task.DOC_MC, Task.DOCMATH_QA
TASKS_BY_SOURCE = {"ultrafineweb": ["doc_general_qa", "doc_mc"], "docmath": ["docmath_qa"]}


def corpus(n_web=10, n_math=5):
    rows = [DocSet(f"ultrafineweb_{i}", str(i), ("d",)) for i in range(n_web)]
    return rows + [DocSet("docmath_x", f"m{i}", ("d",)) for i in range(n_math)]


def test_assign_tasks_disjoint_halves_and_seeded():
    rows = corpus(11, 4)
    split = assign_tasks(rows, TASKS_BY_SOURCE, random.Random(0))
    assert sorted(split[GQ] + split[MC]) == list(range(11))
    assert not set(split[GQ]) & set(split[MC]) and {len(split[GQ]), len(split[MC])} == {5, 6}
    assert sorted(split[DM]) == list(range(11, 15))
    assert assign_tasks(rows, TASKS_BY_SOURCE, random.Random(0)) == split
    with pytest.raises(ValueError, match="data.tasks.other"):
        assign_tasks([DocSet("other_x", "1", ("d",))], TASKS_BY_SOURCE, random.Random(0))


def test_round_counts_reference_and_remainder():
    w = {GQ: 1.0, MC: 1.0, DM: 1.0}
    assert round_counts(w, 480) == {GQ: 160, MC: 160, DM: 160}
    assert round_counts(w, 10) == {GQ: 4, MC: 3, DM: 3}  # remainder by weight, ties by name
    assert round_counts({GQ: 1.0, MC: 3.0, DM: 0.0}, 10) == {GQ: 2, MC: 8}
    with pytest.raises(ValueError, match="positive weight"):
        round_counts({GQ: 0.0}, 10)


def test_each_task_walks_its_rows_then_reshuffles():
    sampler = DomainSampler(
        {GQ: range(10), DM: range(10, 16)}, {"doc_general_qa": 1, "docmath_qa": 1}, 8, seed=1
    )
    first = sampler.next_round()
    second = sampler.next_round()
    assert Counter(t for t, _ in first) == {GQ: 4, DM: 4}
    gq = [i for t, i in first + second if t is GQ]
    assert len(set(gq)) == 8  # no repeats within one pass of 10 rows
    dm1 = [i for t, i in first if t is DM]
    dm2 = [i for t, i in second if t is DM]
    assert len(set(dm1)) == 4 and len(set(dm2)) == 4
    assert all(10 <= i < 16 for i in dm1 + dm2)


def test_leftovers_of_a_pass_are_discarded():
    """A round needing more rows than its pass has left starts a fresh pass over all rows: the 2
    leftovers are not carried over (a fresh pass's first 4 of 6 hold both only sometimes)."""
    both_kept = []
    for seed in range(8):
        sampler = DomainSampler({DM: range(6)}, {"docmath_qa": 1}, 4, seed=seed)
        first = [i for _, i in sampler.next_round()]
        second = [i for _, i in sampler.next_round()]
        leftovers = set(range(6)) - set(first)
        assert len(leftovers) == 2 and len(set(second)) == 4
        both_kept.append(leftovers <= set(second))
    assert not all(both_kept), both_kept


def test_more_needed_than_rows():
    sampler = DomainSampler({MC: [0, 1]}, {"doc_mc": 1}, 5, seed=0)
    pairs = sampler.next_round()
    assert len(pairs) == 5 and Counter(i for _, i in pairs).keys() <= {0, 1}


def test_seeded_and_resumable_through_json():
    def make():
        return DomainSampler(
            {GQ: range(7), MC: range(7, 20), DM: range(20, 25)}, {t.value: 1 for t in Task}, 6, 42
        )

    a = make()
    for _ in range(3):
        a.next_round()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_round() for _ in range(5)]
    b = make()
    b.load_state_dict(state)
    assert [b.next_round() for _ in range(5)] == expected
    assert b.num_rounds == 8
    fresh = make()
    assert [fresh.next_round() for _ in range(3)] != expected[:3]  # not a replay from the start
    with pytest.raises(ValueError, match="same data.paths"):
        DomainSampler({GQ: range(3)}, {"doc_general_qa": 1}, 2, 0).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gen_batch_size"):
        DomainSampler({GQ: [0]}, {"doc_general_qa": 1}, 0, 0)
    with pytest.raises(ValueError, match="no task"):
        DomainSampler({GQ: []}, {"doc_general_qa": 1}, 4, 0)
