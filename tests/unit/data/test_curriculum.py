"""Questioner document selection (docs/spell-algorithm.md §1.2, §4.1, §4.2) and the optional
explicit schedule."""

import random

import pytest

from megatron_spell.data.curriculum import CurriculumSchedule, draw_num_new_docs, select_documents
from megatron_spell.types import HistoryEntry


def test_plain_selection_sorted_without_replacement():
    rng = random.Random(0)
    for _ in range(20):
        picked = select_documents(20, 5, [], rng)
        assert len(picked) == 5 and picked == sorted(set(picked))
    assert select_documents(3, 5, [], rng) == [0, 1, 2]


def test_memory_driven_growth_5_10_15():
    rng = random.Random(1)
    history = []
    sizes = []
    for _ in range(4):
        picked = select_documents(17, 5, history, rng)
        sizes.append(len(picked))
        assert set().union(*(set(e.evidence) for e in history)) <= set(picked)
        history.append(HistoryEntry(tuple(picked), "q", "a"))
    assert sizes == [5, 10, 15, 17]  # all remaining documents once fewer than n are left


def test_draw_num_new_docs():
    rng = random.Random(0)
    assert draw_num_new_docs({"docmath": (5,)}, "docmath_x", rng) == 5
    assert draw_num_new_docs({"default": (2,)}, "web_x", rng) == 2
    assert draw_num_new_docs({}, "web_x", rng) == 3  # the reference's fallback
    assert {draw_num_new_docs({"web": (1, 4)}, "web_x", rng) for _ in range(50)} == {1, 4}
    with pytest.raises(ValueError, match="n_docs"):
        draw_num_new_docs({"web": (0,)}, "web_x", rng)


def test_schedule_stages_and_caps():
    sched = CurriculumSchedule(docs_per_stage=(2, 4, 8), steps_per_stage=10)
    assert [sched.stage(s) for s in (0, 9, 10, 25, 1000)] == [0, 0, 1, 2, 2]
    assert sched.limits(15) == (4, None)
    assert CurriculumSchedule().limits(5) == (None, None)
    rng = random.Random(0)
    history = [HistoryEntry((0, 1, 2, 3, 4, 5), "q", "a")]
    picked = select_documents(20, 5, history, rng, max_docs=4)
    assert len(picked) == 4 and set(picked) <= set(range(6))  # evidence subsampled to the cap
    picked = select_documents(20, 5, [HistoryEntry((0,), "q", "a")], rng, max_docs=3)
    assert 0 in picked and len(picked) == 3


def test_token_cap():
    rng = random.Random(0)
    tokens = [100] * 10
    picked = select_documents(10, 6, [], rng, max_tokens=250, doc_tokens=tokens)
    assert len(picked) == 2
    assert (
        len(select_documents(10, 6, [], rng, max_tokens=10, doc_tokens=tokens)) == 1
    )  # at least one
    with pytest.raises(ValueError, match="doc_tokens"):
        select_documents(10, 6, [], rng, max_tokens=10)


def test_schedule_validation():
    with pytest.raises(ValueError, match="steps_per_stage"):
        CurriculumSchedule(docs_per_stage=(2,))
    with pytest.raises(ValueError, match="equal lengths"):
        CurriculumSchedule(docs_per_stage=(2,), tokens_per_stage=(1, 2), steps_per_stage=1)
    with pytest.raises(ValueError, match=">= 1"):
        CurriculumSchedule(docs_per_stage=(0,), steps_per_stage=1)
