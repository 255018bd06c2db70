"""Shared-prefix packing and attention against the same trajectories packed as separate sequences.

Packing: every response token of a shared unit has the same (input token, position, label, advantage,
old log-prob, sequence length) as in its own sequence. Attention: a unit built from the rows of separate
sequences gives the same outputs and input gradients as causal attention over each sequence, and the same
outputs as a naive softmax under `shared_prefix_mask`; a mask that lets siblings see each other fails.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_spell.mcore import attention, packing
from megatron_spell.mcore.attention import SharedPrefixSeqParams, shared_prefix_mask
from megatron_spell.mcore.packing import (
    TrainSample,
    build_micro_batch,
    pack_batch,
    pad_multiple,
    plan_units,
    response_values,
)
from tests.unit.mcore.test_attention import _module, naive_causal
from tests.unit.mcore.test_packing import _unsplit

pytestmark = pytest.mark.usefixtures("megatron_on_cpu")


def _group(prompt_len: int, response_lens, seed: int = 0) -> list[TrainSample]:
    rng = random.Random(seed)
    prompt = [rng.randint(1, 99) for _ in range(prompt_len)]
    return [
        TrainSample(
            prompt_ids=prompt,
            response_ids=[rng.randint(100, 199) for _ in range(r)],
            advantage=rng.uniform(-1, 1),
            old_logprobs=[-rng.random() for _ in range(r)],
        )
        for r in response_lens
    ]


def _batch() -> list[TrainSample]:
    """A group of 4 (one empty response), a single trajectory, a group of 2, interleaved."""
    a, b = _group(7, [4, 0, 6, 1], seed=1), _group(3, [5, 2], seed=2)
    single = _group(5, [3], seed=3)
    return [a[0], b[0], a[1], single[0], a[2], b[1], a[3]]


_FIELDS = ("tokens", "position_ids", "labels", "advantages", "old_logprobs", "seq_num_loss_tokens")


def _per_response_token(mb, full_fields) -> dict[int, list[tuple]]:
    """{sample id: [(token, position, label, advantage, old, seq_len) per response token]}."""
    out = {}
    for sid, (a, b) in zip(mb.sample_ids, mb.response_spans):
        rows = zip(*(full_fields[f][a:b].tolist() for f in _FIELDS))
        out[sid] = [tuple(r) for r in rows]
    return out


def _rows_of_both_packings():
    samples = _batch()
    ids = list(range(len(samples)))
    plain = build_micro_batch(samples, ids, multiple=1)
    shared = build_micro_batch(samples, ids, multiple=4, units=[[0, 2, 4, 6], [1, 5], [3]])
    return (
        _per_response_token(plain, {f: getattr(plain, f) for f in _FIELDS}),
        _per_response_token(shared, {f: getattr(shared, f) for f in _FIELDS}),
    )


def test_positions_restarting_at_zero_are_caught(monkeypatch):
    monkeypatch.setattr(packing, "response_positions", lambda p, r: torch.arange(r))
    plain_rows, shared_rows = _rows_of_both_packings()
    assert plain_rows != shared_rows


def test_shared_unit_rows_equal_separate_sequences():
    plain_rows, shared_rows = _rows_of_both_packings()
    assert shared_rows == plain_rows
    samples = _batch()
    ids = list(range(len(samples)))
    units = [[0, 2, 4, 6], [1, 5], [3]]
    plain = build_micro_batch(samples, ids, multiple=1)
    shared = build_micro_batch(samples, ids, multiple=4, units=units)
    assert [len(shared_rows[i]) for i in ids] == [len(s.response_ids) for s in samples]
    # the prompt is stored once, minus its last token, at positions 0..P-2, without loss
    cu = shared.cu_seqlens_padded.tolist()
    assert shared.tokens[: 7 - 1].tolist() == list(samples[0].prompt_ids[:-1])
    assert shared.position_ids[: 7 - 1].tolist() == list(range(6))
    assert float(shared.loss_mask.sum()) == sum(len(s.response_ids) for s in samples)
    assert float(shared.loss_mask[:6].sum()) == 0.0
    # segments: prompt, the non-empty responses, padding; the single trajectory is one segment
    assert shared.unit_segments == ((0, 6, 10, 16, 17, 20), (0, 2, 7, 9, 12), (0, 8))
    assert cu == [0, 20, 32, 40]
    assert torch.equal(shared.rope_positions, shared.position_ids)
    assert shared.num_loss_tokens == plain.num_loss_tokens
    # a pack of ordinary sequences carries no segments
    assert plain.unit_segments is None and plain.rope_positions is None


@pytest.mark.parametrize("cp", [2, 3])
def test_shared_unit_cp_split_reassembles(cp):
    samples = _batch()
    units = [[0, 2, 4, 6], [1, 5], [3]]
    multiple = pad_multiple(cp, 1, False)
    ref = build_micro_batch(samples, range(7), multiple=multiple, units=units)
    parts = [
        build_micro_batch(samples, range(7), multiple=multiple, cp_size=cp, cp_rank=r, units=units)
        for r in range(cp)
    ]
    for name in ("tokens", "labels", "loss_mask", "position_ids", "advantages", "old_logprobs"):
        assert torch.equal(_unsplit(parts, name), getattr(ref, name)), name
    for p in parts:
        assert p.unit_segments == ref.unit_segments
        assert torch.equal(p.rope_positions, ref.rope_positions)
    got = response_values(parts[0], _unsplit(parts, "old_logprobs"))
    for sid, s in enumerate(samples):
        assert torch.allclose(got[sid], torch.tensor(s.old_logprobs))


def test_budget_split_carries_the_prompt_and_counts():
    group = _group(18, [5, 11, 1, 8], seed=4)
    units, split, fallback = plan_units(group, multiple=1, budget=29)
    # first-fit decreasing with the prompt stored as 17 tokens: {11, 1} (17 + 12), then 8 and 5 alone
    # (17 + 8 + 5 = 30 > 29), packed as ordinary sequences of 18 + 8 and 18 + 5 tokens
    assert sorted(map(sorted, units)) == [[0], [1, 2], [3]]
    assert (split, fallback) == (2, 2)
    packed = pack_batch(group, max_tokens_per_microbatch=29, shared_prefix=True)
    assert (packed.num_shared_units, packed.num_split_units, packed.num_unshared_fallback) == (
        1,
        2,
        2,
    )
    assert packed.global_num_tokens == (17 + 12) + (18 + 8) + (18 + 5)
    assert all(mb.num_padded_tokens <= 29 for mb in packed.micro_batches)
    seen = sorted(i for mb in packed.micro_batches for i in mb.sample_ids)
    assert seen == [0, 1, 2, 3]
    # the whole group fits a larger budget: one unit of P - 1 + sum R tokens
    whole = pack_batch(group, max_tokens_per_microbatch=64, shared_prefix=True)
    assert (whole.num_shared_units, whole.num_split_units, whole.global_num_tokens) == (1, 0, 42)
    unshared = pack_batch(group, max_tokens_per_microbatch=64)
    assert unshared.global_num_tokens == 4 * 18 + 25 and unshared.num_shared_units == 0


def test_dp_balances_units_by_their_cost():
    big, small = _group(40, [4, 4, 4, 4], seed=5), _group(10, [6, 6], seed=6)
    singles = [_group(20, [10], seed=7 + i)[0] for i in range(3)]
    samples = [*big, *small, *singles]
    per_rank = [
        pack_batch(samples, max_tokens_per_microbatch=256, dp_size=2, dp_rank=d, shared_prefix=True)
        for d in range(2)
    ]
    assignment = per_rank[0].dp_assignment
    # a group never straddles DP ranks; costs: 55 (big), 21 (small), 30 x 3 -> 55 + 30 | 30 + 30 + 21
    assert any(set(range(4)) <= set(a) for a in assignment)
    assert any({4, 5} <= set(a) for a in assignment)
    loads = sorted(sum(mb.num_padded_tokens for mb in b.micro_batches) for b in per_rank)
    assert loads == [81, 85]


# --- attention -----------------------------------------------------------------------------------


def _separate_and_shared(prompt_len, response_lens, groups=2, heads=4, dim=16, multiple=4, seed=0):
    """Leaf q/k/v rows of a prompt and of each response; the separate sequences and the shared unit
    assembled from them (differentiably) plus the unit's segment boundaries."""
    g = torch.Generator().manual_seed(seed)

    def rows(n, h):
        return torch.randn(n, h, dim, generator=g, dtype=torch.float64, requires_grad=True)

    prompt = [rows(prompt_len, h) for h in (heads, groups, groups)]
    resp = [[rows(r, h) for h in (heads, groups, groups)] for r in response_lens]
    separate = [[torch.cat([p, r]) for p, r in zip(prompt, rs)] for rs in resp]
    head = prompt_len - 1
    real = head + sum(response_lens)
    length = -(-real // multiple) * multiple
    unit = []
    for j, h in enumerate((heads, groups, groups)):
        parts = [prompt[j][:head]]
        parts += [torch.cat([prompt[j][head:], rs[j][:-1]]) for rs in resp]
        parts.append(torch.zeros(length - real, h, dim, dtype=torch.float64))
        unit.append(torch.cat(parts))
    bounds = [0, head, *(head + sum(response_lens[: i + 1]) for i in range(len(response_lens)))]
    if length > real:
        bounds.append(length)
    leaves = [*prompt, *(x for rs in resp for x in rs)]
    return separate, unit, tuple(bounds), leaves


def _shared_attention(unit, bounds):
    params = SharedPrefixSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.tensor([0, bounds[-1]], dtype=torch.int32),
        cu_seqlens_kv=torch.tensor([0, bounds[-1]], dtype=torch.int32),
        max_seqlen_q=bounds[-1],
        max_seqlen_kv=bounds[-1],
        unit_segments=(bounds,),
    )
    return _module()(*unit, None, packed_seq_params=params).reshape(bounds[-1], 4, 16)


def _check_equal_to_separate(prompt_len, response_lens):
    separate, unit, bounds, leaves = _separate_and_shared(prompt_len, response_lens)
    out = _shared_attention(unit, bounds)
    head = prompt_len - 1
    sep_out = [naive_causal(*s).reshape(-1, 4, 16) for s in separate]
    torch.testing.assert_close(out[:head], sep_out[0][:head])
    g = torch.Generator().manual_seed(1)
    loss_shared = loss_sep = 0.0
    for i, r in enumerate(response_lens):
        a = bounds[1 + i]
        torch.testing.assert_close(out[a : a + r], sep_out[i][head : head + r])
        w = torch.randn(r, 4, 16, generator=g, dtype=torch.float64)
        loss_shared = loss_shared + (out[a : a + r] * w).sum()
        loss_sep = loss_sep + (sep_out[i][head : head + r] * w).sum()
    got = torch.autograd.grad(loss_shared, leaves, allow_unused=True)
    exp = torch.autograd.grad(loss_sep, leaves, allow_unused=True)
    for a, b in zip(got, exp):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prompt_len,response_lens", [(9, [3, 5, 1, 4]), (1, [2, 3]), (6, [7])])
def test_shared_attention_equals_separate_sequences(prompt_len, response_lens):
    _check_equal_to_separate(prompt_len, response_lens)


def test_shared_attention_equals_naive_masked_softmax():
    _, unit, bounds, _ = _separate_and_shared(8, [3, 4, 2])
    out = _shared_attention(unit, bounds)
    seg = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    pos = torch.cat(
        [torch.arange(7)] + [torch.arange(7, 7 + b - a) for a, b in zip(bounds[1:-1], bounds[2:])]
    )
    mask = shared_prefix_mask(seg, pos, seg, pos)
    q, k, v = unit
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("shd,thd->hst", q, k) / 4.0
    ref = torch.einsum("hst,thd->shd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(out, ref)
    # siblings never see each other; every row sees its own position
    assert not mask[bounds[2], bounds[1]] and mask[bounds[2], 0] and mask.diagonal().all()


def test_sibling_visible_mask_is_caught(monkeypatch):
    """The equivalence check fails when a response may also attend to its earlier siblings."""
    monkeypatch.setattr(attention, "key_ranges", lambda segs, segment, end: [(segs[0], end)])
    with pytest.raises(AssertionError):
        _check_equal_to_separate(9, [3, 5, 1, 4])
