"""The SPELL step loop with a scripted engine and a recording policy: rounds, batch sizes, sync, history."""

import random

import pytest

from megatron_spell.config import load_config
from megatron_spell.data.curriculum import CurriculumSchedule
from megatron_spell.data.history import HistoryMemory
from megatron_spell.data.sampler import DomainSampler
from megatron_spell.loop import Collective, Run, spell_step
from megatron_spell.metrics import MetricsLogger
from megatron_spell.rollout.metrics import WeightSyncStats
from megatron_spell.rollout.roles import RoleEngine
from megatron_spell.spell.batching import BatchNotReadyError
from megatron_spell.types import DocSet, Role, Task
from tests.helpers.clock import FakeClock
from tests.unit.test_gen_round import FakeChat, FakeGenerator

DOCS = [
    DocSet("hotpotqa_docs", f"row{i}", ("Alpha doc about Alice.", "Beta doc.", "Gamma doc."))
    for i in range(4)
]


class Engine(FakeGenerator):
    def __init__(self, chat, events=None):
        super().__init__(chat)
        self.loaded = []
        self.events = [] if events is None else events

    def generate(self, prompt_ids, n, *, max_tokens=None, constraint=None):
        self.events.append("generate")
        return super().generate(prompt_ids, n, max_tokens=max_tokens, constraint=constraint)

    def load_weights(self, weights):
        self.loaded.append(list(weights))
        self.events.append("engine.load_weights")
        return WeightSyncStats(seconds=0.0, num_bytes=0, num_tensors=len(self.loaded[-1]))

    def sleep(self, level=1):
        self.events.append(f"engine.sleep({level})")

    def wake_up(self, tags=None):
        self.events.append(f"engine.wake_up({','.join(tags)})")


class Policy:
    def __init__(self, events=None):
        self.batches = []
        self.events = [] if events is None else events

    def update(self, batch):
        self.batches.append(batch)
        self.events.append("policy.update")
        return {"loss": 0.5, "grad_norm": 1.0}

    def export_weights(self):
        self.events.append("policy.export_weights")
        yield [("model.embed_tokens.weight", [0.0])]

    def onload(self):
        self.events.append("policy.onload")

    def offload_training_state(self):
        self.events.append("policy.offload_training_state")

    def offload_params(self):
        self.events.append("policy.offload_params")


def make_run(tmp_path, *overrides, docs=DOCS, events=None):
    cfg = load_config(
        None,
        [
            "model.hf_dir=/m",
            f"output_dir={tmp_path}",
            "data.gen_batch_size=4",
            "data.tasks={hotpotqa: [doc_general_qa]}",
            "data.domain_weights={doc_general_qa: 1.0}",
            "data.n_docs={default: [2]}",
            "spell.train_batch_size=2",
            "spell.responder_n=4",
            "spell.verifier_n=4",
            "spell.max_num_gen_batches=3",
            *overrides,
        ],
    )
    chat = FakeChat()
    sampler = DomainSampler(
        {Task.DOC_GENERAL_QA: list(range(len(docs)))},
        cfg.data.domain_weights,
        cfg.data.gen_batch_size,
        seed=0,
    )
    return Run(
        config=cfg,
        corpus=docs,
        sampler=sampler,
        history=HistoryMemory(3, lower=0.01, upper=0.99),
        curriculum=CurriculumSchedule(),
        engine=RoleEngine(Engine(chat, events), sleep_level=cfg.rollout.sleep_level),
        chat=chat,
        policy=Policy(events),
        metrics=MetricsLogger(tmp_path, tensorboard=False),
        collective=Collective(),
        rng=random.Random(0),
        doc_rng=random.Random(1),
    )


def test_step_builds_batch_updates_and_syncs(tmp_path, monkeypatch):
    import megatron_spell.metrics

    # a timer span is 1.0 s
    monkeypatch.setattr(megatron_spell.metrics, "time", FakeClock(start=0.0, step=1.0))
    run = make_run(tmp_path)
    out = spell_step(run)
    (batch,) = run.policy.batches
    assert len(batch.responder) == 2 * 4  # train_batch_size groups x responder_n
    assert {t.role for t in batch.responder} == {Role.RESPONDER}
    assert len([t for t in batch.questioner if t.case is None]) == 2
    assert len(run.engine.engine.loaded) == 1  # one weight sync after the update
    assert out["train/loss"] == 0.5 and out["batch/num_responder"] == 8
    # one generate and one score span per gen round, one train and one sync span per step
    rounds = out["batch/num_gen_rounds"]
    assert rounds >= 1 and out["timing/generate_s"] == out["timing/score_s"] == rounds
    assert out["timing/train_s"] == out["timing/sync_s"] == 1.0
    # questions with 0 < success < 1 were remembered for their rows
    assert out["data/history_size"] >= 1
    assert run.step == 1


def test_the_device_changes_hands_in_order_and_memory_is_logged_at_each_transition(
    tmp_path, caplog
):
    """docs/architecture.md "One step on one device": vLLM sleeps before the update, Megatron's state
    comes back for it and leaves after it, the weights wake for the sync, the KV cache after it."""
    events = []
    run = make_run(tmp_path, events=events)
    readings = iter(range(100))
    run.device_memory = lambda: {"allocated_gib": float(next(readings)), "free_gib": 1.0}
    run.empty_cache = lambda: events.append("empty_cache")
    with caplog.at_level("INFO", logger="megatron_spell.loop"):
        out = spell_step(run)
    after = events[len(events) - events[::-1].index("generate") :]  # the last generate on
    assert after == [
        "engine.sleep(2)",
        "empty_cache",
        "policy.onload",
        "policy.update",
        "policy.offload_training_state",
        "empty_cache",
        "engine.wake_up(weights)",
        "policy.export_weights",
        "engine.load_weights",
        "policy.offload_params",
        "empty_cache",
        "engine.wake_up(kv_cache)",
    ]
    transitions = [
        "generated",
        "rollout_asleep",
        "policy_onloaded",
        "updated",
        "training_state_offloaded",
        "weights_awake",
        "synced",
        "params_offloaded",
        "kv_cache_awake",
    ]
    assert [out[f"memory/{t}/allocated_gib"] for t in transitions] == list(range(9))
    (line,) = [r.message for r in caplog.records if "memory GiB" in r.message]
    assert line.startswith("step 1 memory GiB (allocated/free): generated 0.00/1.00 | ")
    assert [part.split()[0] for part in line.split(": ", 1)[1].split(" | ")] == transitions


def test_sleep_level_0_keeps_the_engine_resident(tmp_path):
    events = []
    spell_step(make_run(tmp_path, "rollout.sleep_level=0", events=events))
    assert not [e for e in events if e.startswith(("engine.sleep", "engine.wake_up"))]
    assert "policy.update" in events


def test_shortfall_errors_or_trains_available(tmp_path):
    bad = [
        DocSet("hotpotqa_docs", "r", ("Gamma doc.",))
    ]  # the fake questioner never writes JSON here
    run = make_run(tmp_path, docs=bad)
    with pytest.raises(BatchNotReadyError, match="spell.max_num_gen_batches=3"):
        spell_step(run)
    run = make_run(tmp_path / "b", "spell.on_batch_shortfall=train_available", docs=bad)
    out = spell_step(run)
    assert out["batch/shortfall"] == 2 and out["train/skipped_empty"] == 1.0
    assert out["batch/num_gen_rounds"] == 3


def test_step_without_an_engine_names_replay(tmp_path):
    run = make_run(tmp_path)
    run.engine = None
    with pytest.raises(ValueError, match="built for replay"):
        spell_step(run)
