"""Routing replay rows packed like the tokens (ordinary sequences and shared-prefix units), split for
CP and DP, equal from whole samples and from the exchange, and the prompt-row disagreement count."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_spell.mcore.packing import TrainSample, pack_batch, plan_batch
from megatron_spell.mcore.routing_exchange import exchange_routing, local_routing
from megatron_spell.types import RoutedExperts
from tests.unit.mcore.test_packing import _samples
from tests.unit.mcore.test_shared_prefix import _batch

LAYERS = 3


def _encode(samples: list[TrainSample]) -> list[TrainSample]:
    """Per token t of sample s: experts (t % 8, 8 + t % 8) in the prompt[:-1] rows (equal across a
    group) and (t % 8, 16 + s) from prompt[-1] on (the sample's own); the last row has none."""
    out = []
    for sid, s in enumerate(samples):
        ids = np.array(s.prompt_ids + s.response_ids)
        second = np.where(np.arange(len(ids)) < len(s.prompt_ids) - 1, 8 + ids % 8, 16 + sid)
        r = np.stack([ids % 8, second], axis=-1)[:, None, :].repeat(LAYERS, axis=1)
        r = r.astype(np.uint8)
        r[-1] = 255
        out.append(dataclasses.replace(s, routing=r))
    return out


def _expected(mb, row: int, samples) -> list | None:
    """What local row `row` of `mb` must hold (None: -1), from its token and its segment's owner."""
    p, t = int(mb.global_positions[row]), int(mb.tokens[row])
    for sid, (a, b) in zip(mb.sample_ids, mb.response_spans):
        if a <= p < b:  # prompt[-1] or a response token of sample sid (not its last)
            return [[t % 8, 16 + sid]] * LAYERS
    cu = mb.cu_seqlens_padded.tolist()
    k = next(j for j in range(len(cu) - 1) if cu[j] <= p < cu[j + 1])
    starts = [a for a, _ in mb.response_spans if cu[k] <= a < cu[k + 1]]
    if starts and p < min(starts):  # prompt[:-1] of the unit
        return [[t % 8, 8 + t % 8]] * LAYERS
    return None  # the last token of an ordinary sequence, padding, a pad sequence


def _ctx(dp_rank, cp_size, cp_rank):
    return SimpleNamespace(dp_rank=dp_rank, cp=cp_size, cp_rank=cp_rank, device=torch.device("cpu"))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dp,cp,tp,sp", [(1, 1, 1, False), (2, 2, 1, False), (1, 2, 2, True)])
def test_routing_is_packed_and_split_like_the_tokens(shared, dp, cp, tp, sp):
    samples = _encode(_batch() + _samples(5, seed=3))
    kw = dict(max_tokens_per_microbatch=64, dp_size=dp, cp_size=cp, tp_size=tp,
              sequence_parallel=sp, shared_prefix=shared)  # fmt: skip
    plan = plan_batch(samples, **kw)
    refs = [RoutedExperts(0, data=np.asarray(s.routing)) for s in samples]
    seen = 0
    for d in range(dp):
        for c in range(cp):
            local = local_routing(samples, plan, cp, c, d)
            got = exchange_routing(refs, samples, plan, _ctx(d, cp, c))
            assert sorted(local.rows) == sorted(got.rows) == sorted(plan.assignment[d])
            for u, rows in local.rows.items():
                assert torch.equal(rows, got.rows[u]), u
            assert local.num_prompt_differ == got.num_prompt_differ == 0
            packed = pack_batch(samples, dp_rank=d, cp_rank=c, equal_length=True, plan=plan,
                                routing=local.rows, **kw)  # fmt: skip
            for mb in packed.micro_batches:
                if not mb.sample_ids:
                    assert mb.routing is None
                    continue
                assert mb.routing.shape == (mb.num_local_tokens, LAYERS, 2)
                assert mb.routing.dtype == torch.int16
                for row in range(mb.num_local_tokens):
                    want = _expected(mb, row, samples)
                    if want is None:
                        assert (mb.routing[row] == -1).all(), row
                    else:
                        assert mb.routing[row].tolist() == want, row
                        seen += 1
    RoutedExperts.release_all()
    # every token through the model that has a next token carries routing exactly once
    assert seen == sum(
        c - (len(plan.units[u]) == 1) for u, c in enumerate(_unit_tokens(plan, samples))
    )


def _unit_tokens(plan, samples) -> list[int]:
    """Unpadded tokens of each unit."""
    out = []
    for unit in plan.units:
        if len(unit) == 1:
            out.append(samples[unit[0]].num_tokens)
        else:
            head = len(samples[unit[0]].prompt_ids) - 1
            out.append(head + sum(len(samples[i].response_ids) for i in unit))
    return out


def test_disagreeing_prompt_rows_take_the_first_sample_and_are_counted():
    samples = _encode(_batch())  # group a: samples 0, 2, 4, 6; group b: 1, 5
    bad = samples[4].routing.clone()
    bad[2, 1] = torch.tensor([5, 6], dtype=torch.int16)  # a prompt row of the third of group a
    samples[4] = dataclasses.replace(samples[4], routing=bad)
    plain = [dataclasses.replace(s, routing=None) for s in samples]
    plan = plan_batch(plain, max_tokens_per_microbatch=256, shared_prefix=True)
    assert [len(u) for u in plan.units] == [4, 2, 1]
    refs = [RoutedExperts(0, data=s.routing.numpy()) for s in samples]
    for got in (
        local_routing(samples, plan, 1, 0, 0),
        exchange_routing(refs, plain, plan, _ctx(0, 1, 0)),
    ):
        assert got.num_prompt_differ == 1
        head = len(samples[0].prompt_ids) - 1
        assert torch.equal(got.rows[0][:head], samples[0].routing[:head])
    # a group whose first sample has no routing takes the next one's prompt rows
    refs[0] = None
    got = exchange_routing(refs, plain, plan, _ctx(0, 1, 0))
    assert torch.equal(got.rows[0][:head], samples[2].routing[:head])
    assert got.num_prompt_differ == 1  # sample 4 against sample 2
    RoutedExperts.release_all()


def test_routing_shape_checked():
    s = _samples(1)[0]
    with pytest.raises(ValueError, match=r"TrainSample.routing has shape \(3, 2\)"):
        TrainSample(prompt_ids=s.prompt_ids, response_ids=s.response_ids, routing=torch.zeros(3, 2))
