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


def test_engine_settings_validation_and_moe_detection(tmp_path):
    import json

    from megatron_spell.config import RolloutConfig
    from megatron_spell.rollout.engine import _is_moe

    assert RolloutConfig(max_prompt_length=10, max_response_length=6).max_model_len == 16
    with pytest.raises(ValueError, match="logprobs_mode"):
        RolloutConfig(logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="max_prompt_length"):
        RolloutConfig(max_prompt_length=0)
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 4}))
    assert _is_moe(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    assert not _is_moe(str(tmp_path))
