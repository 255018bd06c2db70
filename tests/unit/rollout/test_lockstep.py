"""Lockstep generation across ranks: two ranks, one with nothing to generate, make the same engine calls.

The fake engine models vLLM data parallel: a call with requests steps together with the other ranks (a
barrier that breaks when the other rank never joins), a call without requests returns at once (vLLM's
generate has nothing to run). A rank that skips a call, or enters it without a request, leaves the other
rank waiting: here the barrier breaks instead of hanging.
"""

import threading

import pytest

from megatron_spell.config import SpellConfig
from megatron_spell.gen_round import QuestionerInput, run_gen_round
from megatron_spell.rollout.lockstep import DUMMY_PROMPT, LockstepEngine
from megatron_spell.rollout.metrics import WeightSyncStats
from megatron_spell.spell.schemas import output_constraint
from megatron_spell.types import Completion, Role, Task
from tests.unit.test_gen_round import DOCS, FakeChat, FakeGenerator


class DataParallelFake(FakeGenerator):
    """A scripted engine whose calls with requests wait for the other rank's call."""

    def __init__(self, chat, barrier: threading.Barrier):
        super().__init__(chat)
        self.barrier = barrier
        self.requests: list[list[list[int]]] = []

    def generate(self, prompt_ids, n, *, max_tokens=None, constraint=None):
        self.requests.append([list(p) for p in prompt_ids])
        if not prompt_ids:
            return []
        self.barrier.wait()
        if [tuple(p) for p in prompt_ids] == [DUMMY_PROMPT] and max_tokens == 1:
            return [[Completion(token_ids=(5,), text="", logprobs=(0.0,), finish_reason="length")]]
        return super().generate(prompt_ids, n, max_tokens=max_tokens, constraint=constraint)


INPUTS = [
    QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1)),
    QuestionerInput(task=Task.DOC_MC, docset=DOCS, evidence=(0, 1, 2)),
]


def run_two_ranks(*, lockstep: bool, structured=(), spell=None, timeout=10.0):
    """rank 0 generates INPUTS, rank 1 has no prompts; the engines and the round results per rank."""
    spell = spell or SpellConfig(responder_n=2, verifier_n=2)
    barrier = threading.Barrier(2, timeout=timeout)
    engines, results, errors = {}, {}, {}

    def rank(r: int) -> None:
        chat = FakeChat()
        engines[r] = DataParallelFake(chat, barrier)
        gen = LockstepEngine(engines[r], structured=structured, lockstep=lockstep)
        try:
            results[r] = run_gen_round(
                INPUTS if r == 0 else [],
                gen,
                chat,
                spell,
                uid_prefix=f"p{r}",
                max_response_tokens=8,
            )
        except threading.BrokenBarrierError as exc:
            errors[r] = exc
            barrier.abort()  # release the other rank too

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * timeout)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting in generate"
    return engines, results, errors


@pytest.mark.parametrize(
    "structured",
    [(), ("questioner", "responder", "verifier"), ("questioner", "responder")],
    ids=["plain", "all-structured", "verifier-plain"],
)
@pytest.mark.parametrize("filter_prompts", [True, False])
def test_rank_without_prompts_enters_every_call(structured, filter_prompts):
    spell = SpellConfig(responder_n=2, verifier_n=2, filter_questioner_prompts=filter_prompts)
    engines, results, errors = run_two_ranks(lockstep=True, structured=structured, spell=spell)
    assert not errors
    # the same number of engine calls on both ranks, and every call of rank 1 is one dummy request
    assert len(engines[0].requests) == len(engines[1].requests)
    assert all(req == [list(DUMMY_PROMPT)] for req in engines[1].requests)
    assert all(req for req in engines[0].requests)  # rank 0 never sent an empty call either
    # phases: questioner, pre-filter (when on), responder, verifier; a constrained one per task
    per_role = {r: len(Task) if r in structured and r != "verifier" else 1 for r in Role}
    phases = [Role.QUESTIONER, Role.RESPONDER, Role.RESPONDER, Role.VERIFIER]
    if not filter_prompts:
        phases.remove(Role.RESPONDER)
    assert len(engines[1].requests) == sum(per_role[p.value] for p in phases)
    # rank 0's round is real; rank 1's is empty
    assert results[0].responder_groups and results[0].metrics["questioner/num_prompts"] == 2
    assert results[1].questioner == [] and results[1].metrics["questioner/num_prompts"] == 0


def test_without_lockstep_the_idle_rank_leaves_the_other_waiting():
    """The check above can fail: an empty call that does not reach the engine breaks the barrier."""
    engines, results, errors = run_two_ranks(lockstep=False, timeout=1.0)
    assert 0 in errors  # rank 0 waited in its first call for a rank that never joined
    assert engines[1].requests and not any(engines[1].requests)


class Recorder:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, *, max_tokens=None, constraint=None):
        self.calls.append((list(map(tuple, prompts)), n, max_tokens, constraint))
        return [[Completion((1,), f"out{p[0]}", (0.0,), "stop")] * n for p in prompts]

    def load_weights(self, weights):
        pairs = [p for bucket in weights for p in bucket]
        return WeightSyncStats(seconds=2.0, num_bytes=4_000_000_000, num_tensors=len(pairs))


def test_per_task_calls_keep_prompt_order_and_empty_calls_are_dummies():
    rec = Recorder()
    eng = LockstepEngine(rec, structured=("responder",), lockstep=True)
    tasks = [Task.DOC_MC, Task.DOC_GENERAL_QA, Task.DOC_MC]
    outs = eng.generate(Role.RESPONDER, tasks, [[10], [11], [12]], 2, max_tokens=7)
    assert [[c.text for c in o] for o in outs] == [["out10"] * 2, ["out11"] * 2, ["out12"] * 2]
    assert [c[0] for c in rec.calls] == [[(11,)], [(10,), (12,)], [DUMMY_PROMPT]]
    assert [c[3] for c in rec.calls[:2]] == [
        output_constraint("responder", Task.DOC_GENERAL_QA),
        output_constraint("responder", Task.DOC_MC),
    ]
    assert rec.calls[2][1:] == (1, 1, None)  # the docmath call of this rank: one dummy token
    assert eng.generate(Role.QUESTIONER, [], [], 1, max_tokens=7) == []
    assert rec.calls[-1] == ([DUMMY_PROMPT], 1, 1, None)
    with pytest.raises(ValueError, match="2 tasks for 1 prompts"):
        eng.generate(Role.VERIFIER, tasks[:2], [[1]], 1)


def test_one_rank_passes_empty_calls_through_and_reports_sync_metrics():
    rec = Recorder()
    eng = LockstepEngine(rec, lockstep=False)
    assert eng.generate(Role.VERIFIER, [], [], 3, max_tokens=5) == []
    assert rec.calls == [([], 3, 5, None)]
    m = eng.load_weights(iter([[("a", None), ("b", None)], [("c", None)]]))
    assert m == {"seconds": 2.0, "bytes": 4e9, "gb_per_s": pytest.approx(2.0)}
