"""The SPELL step loop with a scripted engine and a recording policy: rounds, batch sizes, sync, history."""

import random

import pytest

from megatron_spell.config import load_config
from megatron_spell.data.curriculum import CurriculumSchedule
from megatron_spell.data.history import HistoryMemory
from megatron_spell.data.sampler import DomainSampler
from megatron_spell.loop import Collective, Run, spell_step
from megatron_spell.metrics import MetricsLogger
from megatron_spell.rollout.lockstep import LockstepEngine
from megatron_spell.rollout.metrics import WeightSyncStats
from megatron_spell.spell.batching import BatchNotReadyError
from megatron_spell.types import DocSet, Role, Task
from tests.helpers.clock import FakeClock
from tests.unit.test_gen_round import FakeChat, FakeGenerator

DOCS = [
    DocSet("hotpotqa_docs", f"row{i}", ("Alpha doc about Alice.", "Beta doc.", "Gamma doc."))
    for i in range(4)
]


class Engine(FakeGenerator):
    def __init__(self, chat):
        super().__init__(chat)
        self.loaded = []

    def load_weights(self, weights):
        self.loaded.append(list(weights))
        return WeightSyncStats(seconds=0.0, num_bytes=0, num_tensors=len(self.loaded[-1]))


class Policy:
    def __init__(self):
        self.batches = []

    def update(self, batch):
        self.batches.append(batch)
        return {"loss": 0.5, "grad_norm": 1.0}

    def export_weights(self):
        yield [("model.embed_tokens.weight", [0.0])]


def make_run(tmp_path, *overrides, docs=DOCS):
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
        engine=LockstepEngine(Engine(chat), lockstep=False),
        chat=chat,
        policy=Policy(),
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
