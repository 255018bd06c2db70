"""`rollout.roles.RoleEngine`: which engine calls a role makes, the sync metrics, the phase transitions."""

import pytest

from megatron_spell.rollout.metrics import WeightSyncStats
from megatron_spell.rollout.roles import RoleEngine
from megatron_spell.spell.schemas import output_constraint
from megatron_spell.types import Completion, Role, Task


class Recorder:
    def __init__(self):
        self.calls = []
        self.transitions = []

    def generate(self, prompts, n, *, max_tokens=None, constraint=None):
        self.calls.append((list(map(tuple, prompts)), n, max_tokens, constraint))
        return [[Completion((1,), f"out{p[0]}", (0.0,), "stop")] * n for p in prompts]

    def load_weights(self, weights):
        pairs = [p for bucket in weights for p in bucket]
        return WeightSyncStats(seconds=2.0, num_bytes=4_000_000_000, num_tensors=len(pairs))

    def sleep(self, level=1):
        self.transitions.append(("sleep", level))

    def wake_up(self, tags=None):
        self.transitions.append(("wake_up", tuple(tags)))


def test_per_task_calls_keep_prompt_order_and_tasks_without_prompts_make_no_call():
    rec = Recorder()
    eng = RoleEngine(rec, structured=("responder",))
    tasks = [Task.DOC_MC, Task.DOC_GENERAL_QA, Task.DOC_MC]
    outs = eng.generate(Role.RESPONDER, tasks, [[10], [11], [12]], 2, max_tokens=7)
    assert [[c.text for c in o] for o in outs] == [["out10"] * 2, ["out11"] * 2, ["out12"] * 2]
    assert [c[0] for c in rec.calls] == [[(11,)], [(10,), (12,)]]  # Task order; no docmath call
    assert [c[3] for c in rec.calls] == [
        output_constraint("responder", Task.DOC_GENERAL_QA),
        output_constraint("responder", Task.DOC_MC),
    ]
    with pytest.raises(ValueError, match="2 tasks for 1 prompts"):
        eng.generate(Role.VERIFIER, tasks[:2], [[1]], 1)


def test_a_rank_without_prompts_makes_no_engine_call():
    """Independent rollout replicas: nobody waits for an idle rank, so it calls nothing."""
    rec = Recorder()
    for structured in ((), ("questioner", "verifier")):
        eng = RoleEngine(rec, structured=structured)
        for role in Role:
            assert eng.generate(role, [], [], 3, max_tokens=5) == []
    assert rec.calls == []


def test_sync_metrics_and_phase_transitions_by_sleep_level():
    rec = Recorder()
    eng = RoleEngine(rec, sleep_level=2)
    m = eng.load_weights(iter([[("a", None), ("b", None)], [("c", None)]]))
    assert m == {"seconds": 2.0, "bytes": 4e9, "gb_per_s": pytest.approx(2.0)}
    eng.sleep()
    eng.wake_up(["weights"])
    eng.wake_up(["kv_cache"])
    assert rec.transitions == [("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    resident = Recorder()
    eng = RoleEngine(resident, sleep_level=0)  # the engine keeps its memory through the update
    eng.sleep()
    eng.wake_up(["weights"])
    assert resident.transitions == []
