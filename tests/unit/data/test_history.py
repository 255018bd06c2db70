"""History memory (docs/spell-algorithm.md §4.1) and the D2 / D12 decisions."""

import json

import pytest

from megatron_spell.data.history import HistoryMemory, evidence_union
from megatron_spell.types import DocSet, HistoryEntry, Task


def entry(q, ev=(0, 1)):
    return HistoryEntry(tuple(ev), q, "ans")


def test_default_gate_is_paper_r_que_positive():
    """Decision: remember only 0 < mean < 1; the reference also stores mean == 1.0 ("too easy")."""
    mem = HistoryMemory()
    assert not mem.record(Task.DOC_MC, "r1", entry("q0"), 0.0)
    assert not mem.record(Task.DOC_MC, "r1", entry("q1"), 1.0)
    assert mem.record(Task.DOC_MC, "r1", entry("q2"), 0.125)
    reference = HistoryMemory(lower=0.01, upper=1.0, inclusive=True)
    assert reference.record(Task.DOC_MC, "r1", entry("q1"), 1.0)
    assert not reference.record(Task.DOC_MC, "r1", entry("q3"), 0.005)


def test_dedup_works():
    """Decision: the reference's broken de-dup is fixed; the same question (modulo case/space) is kept once."""
    mem = HistoryMemory()
    assert mem.record("doc_mc", "r", entry("What is X?"), 0.5)
    assert not mem.record("doc_mc", "r", entry("what  is x?", (3,)), 0.5)
    assert mem.entries("doc_mc", "r") == [entry("What is X?")]


def test_bounded_per_task_and_row():
    mem = HistoryMemory(size=3)
    for i in range(5):
        mem.record(Task.DOCMATH_QA, "r", entry(f"q{i}", (i,)), 0.5)
    assert [e.question for e in mem.entries(Task.DOCMATH_QA, "r")] == ["q2", "q3", "q4"]
    assert mem.entries(Task.DOC_MC, "r") == []  # keyed by task too
    assert evidence_union(mem.entries(Task.DOCMATH_QA, "r")) == [2, 3, 4]


def test_serialisable_round_trip():
    mem = HistoryMemory(size=2, lower=0.01, upper=0.99, inclusive=True)
    mem.record(Task.DOC_MC, "a", entry("q1", (4, 2)), 0.5)
    mem.record(Task.DOC_GENERAL_QA, "b", entry("q2"), 0.5)
    state = json.loads(json.dumps(mem.state_dict()))
    back = HistoryMemory.from_state_dict(state)
    assert back.entries(Task.DOC_MC, "a") == mem.entries(Task.DOC_MC, "a")
    assert back.entries(Task.DOC_GENERAL_QA, "b") == [entry("q2")]
    assert (back.size, back.lower, back.upper, back.inclusive) == (2, 0.01, 0.99, True)
    assert len(back) == 2


def test_bad_settings():
    with pytest.raises(ValueError, match="history_size"):
        HistoryMemory(size=0)
    with pytest.raises(ValueError, match="gate"):
        HistoryMemory(lower=0.9, upper=0.1)


def test_rows_of_different_sources_do_not_share_memory():
    """Two corpora that feed one task and both number their rows from 0 keep separate memories."""
    row_a = DocSet("ultrafineweb_en", "0", ("a0", "a1", "a2"))
    row_b = DocSet("hotpotqa_docs", "0", ("b0", "b1"))
    task = Task.DOC_GENERAL_QA
    mem = HistoryMemory()
    assert mem.record(
        task, row_a.question_id, entry("qa", (2,)), 0.5, data_source=row_a.data_source
    )
    assert mem.entries(task, row_b.question_id, data_source=row_b.data_source) == []
    assert mem.entries(task, row_a.question_id, data_source=row_a.data_source) == [
        entry("qa", (2,))
    ]
    # the same question text is not a duplicate of another row's
    assert mem.record(
        task, row_b.question_id, entry("qa", (1,)), 0.5, data_source=row_b.data_source
    )
    assert len(mem) == 2


def test_data_source_round_trips_through_a_checkpoint_state():
    mem = HistoryMemory(size=2)
    mem.record(Task.DOC_MC, "0", entry("q1", (4,)), 0.5, data_source="src_a")
    mem.record(Task.DOC_MC, "0", entry("q2", (5,)), 0.5, data_source="src_b")
    mem.record(Task.DOC_MC, "0", entry("q3"), 0.5)  # a caller that passes no source
    back = HistoryMemory.from_state_dict(json.loads(json.dumps(mem.state_dict())))
    for source in ("src_a", "src_b", None):
        assert back.entries(Task.DOC_MC, "0", data_source=source) == mem.entries(
            Task.DOC_MC, "0", data_source=source
        )
    assert back.entries(Task.DOC_MC, "0", data_source="src_a") == [entry("q1", (4,))]
    assert len(back) == 3


def test_state_keyed_without_the_source_still_loads(caplog):
    """A state from before the data source was in the key loads under data_source None, with a warning."""
    old = {
        "size": 3,
        "lower": 0.0,
        "upper": 1.0,
        "inclusive": False,
        "entries": {
            "doc_general_qa_0": [[[1, 2], "q", "a"]],
            "docmath_qa_row_7": [[[0], "m", "5"]],
        },
    }
    with caplog.at_level("WARNING"):
        back = HistoryMemory.from_state_dict(old)
    assert back.entries(Task.DOC_GENERAL_QA, "0") == [HistoryEntry((1, 2), "q", "a")]
    assert back.entries(Task.DOCMATH_QA, "row_7") == [HistoryEntry((0,), "m", "5")]
    assert back.entries(Task.DOC_GENERAL_QA, "0", data_source="hotpotqa") == []
    assert "without the data source" in caplog.text
