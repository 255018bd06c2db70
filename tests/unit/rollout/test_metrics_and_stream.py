"""Pure parts of the rollout package (sync stats, bucket flattening, tied-head insertion) and the
logprob-mismatch reference helper of the tests."""

from __future__ import annotations

import pytest
import torch

from megatron_spell.rollout.metrics import WeightSyncStats
from megatron_spell.rollout.weights import _Counter, _with_tied_head, flatten
from tests.helpers.logprobs import logprob_mismatch


def test_logprob_mismatch_mean_max():
    m = logprob_mismatch([[-1.0, -2.0], [-0.5]], [[-1.5, -2.0], [-0.25]])
    assert m.num_tokens == 3
    assert m.max_abs == pytest.approx(0.5)
    assert m.mean_abs == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    t = logprob_mismatch(torch.tensor([-1.0, -3.0]), torch.tensor([-1.0, -2.0]))
    assert (t.mean_abs, t.max_abs) == (pytest.approx(0.5), pytest.approx(1.0))
    with pytest.raises(ValueError, match="sequence 0"):
        logprob_mismatch([[-1.0]], [[-1.0, -2.0]])


def test_sync_stats_rate():
    s = WeightSyncStats(seconds=2.0, num_bytes=4_000_000_000, num_tensors=3)
    assert s.gb_per_s == pytest.approx(2.0)
    assert WeightSyncStats(seconds=0.0, num_bytes=1, num_tensors=1).gb_per_s == 0.0


def test_flatten_buckets_and_tied_head():
    emb, w = torch.ones(4, 2), torch.zeros(3)
    buckets = [[("model.embed_tokens.weight", emb)], [("model.norm.weight", w)]]
    counter = _Counter()
    out = list(_with_tied_head(flatten(buckets), True, counter))
    assert [n for n, _ in out] == [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ]
    assert out[1][1] is emb
    assert counter.num_tensors == 2 and counter.num_bytes == (8 + 3) * 4
    # an explicit lm_head in the stream is not duplicated; untied models get no extra head
    pairs = [("model.embed_tokens.weight", emb), ("lm_head.weight", emb)]
    assert [n for n, _ in _with_tied_head(iter(pairs), True, _Counter())] == [
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]
    assert [n for n, _ in _with_tied_head(flatten(buckets), False, _Counter())] == [
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]


def test_engine_settings_validation_and_replica_kwargs(monkeypatch):
    from megatron_spell.config import RolloutConfig
    from megatron_spell.rollout import engine

    assert RolloutConfig(max_prompt_length=10, max_response_length=6).max_model_len == 16
    with pytest.raises(ValueError, match="logprobs_mode"):
        RolloutConfig(logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="max_prompt_length"):
        RolloutConfig(max_prompt_length=0)
    with pytest.raises(ValueError, match="sleep_level"):
        RolloutConfig(sleep_level=3)
    s = RolloutConfig(tensor_parallel_size=2, max_prompt_length=100, max_response_length=28)
    monkeypatch.setattr(engine, "_dist_world", lambda: (5, 8))
    kw = engine._llm_kwargs("/m", s, "bfloat16", dummy_weights=True)
    # four independent TP=2 replicas: external launcher, no vLLM data parallel group
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert "data_parallel_size" not in kw and kw["tensor_parallel_size"] == 2
    assert kw["seed"] == 2  # rank 5 is in replica 2; its TP peer (rank 4) samples alike
    assert kw["load_format"] == "dummy" and kw["enforce_eager"]  # CPU: eager
    monkeypatch.setattr(engine, "_dist_world", lambda: (0, 1))
    kw = engine._llm_kwargs("/m", RolloutConfig(), "float32")
    assert "distributed_executor_backend" not in kw and "load_format" not in kw
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        engine._llm_kwargs("/m", s, "float32")
