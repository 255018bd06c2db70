"""Packing, DP balancing and the load-balanced CP split, checked against a plain per-sequence reference."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_spell.mcore.packing import (
    TrainSample,
    balance_across_dp,
    build_micro_batch,
    cp_split_index,
    pack_batch,
    pad_multiple,
    response_values,
)


def _samples(n: int, seed: int = 0, max_len: int = 40) -> list[TrainSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, max_len), rng.randint(0, max_len // 2)
        out.append(
            TrainSample(
                prompt_ids=[rng.randint(1, 99) for _ in range(p)],
                response_ids=[rng.randint(100, 199) for _ in range(r)],
                advantage=rng.uniform(-1, 1),
                old_logprobs=[-rng.random() for _ in range(r)],
                role=("responder", "questioner", "verifier")[i % 3],
            )
        )
    return out


def _unsplit(mbs_per_cp_rank, field: str) -> torch.Tensor:
    """Reassemble a per-token field from all CP ranks into unsplit pack order."""
    total = mbs_per_cp_rank[0].num_padded_tokens
    full = torch.full((total,), -7, dtype=getattr(mbs_per_cp_rank[0], field).dtype)
    for mb in mbs_per_cp_rank:
        assert (full[mb.global_positions] == -7).all(), "CP ranks overlap"
        full[mb.global_positions] = getattr(mb, field)
    assert (full != -7).all(), "CP ranks leave holes"
    return full


def test_labels_and_mask_match_per_sequence_reference():
    samples = _samples(5)
    mb = build_micro_batch(samples, range(5), multiple=1)
    cu = mb.cu_seqlens_padded.tolist()
    for k, s in enumerate(samples):
        seq = list(s.prompt_ids + s.response_ids)
        toks = mb.tokens[cu[k] : cu[k + 1]].tolist()
        assert toks == seq
        labels = mb.labels[cu[k] : cu[k + 1]].tolist()
        mask = mb.loss_mask[cu[k] : cu[k + 1]].tolist()
        for p in range(len(seq) - 1):
            if mask[p]:
                assert labels[p] == seq[p + 1]
        # exactly the positions that predict response tokens are in the loss
        expected = [
            1.0 if len(s.prompt_ids) - 1 <= p < len(seq) - 1 else 0.0 for p in range(len(seq))
        ]
        assert mask == expected
        assert mb.position_ids[cu[k] : cu[k + 1]].tolist() == list(range(len(seq)))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cp_split_labels_across_chunk_boundaries(cp):
    """Labels are computed before the split: the last token of a chunk predicts the first of the next."""
    samples = _samples(6, seed=cp)
    multiple = pad_multiple(cp, 1, False)
    ref = build_micro_batch(samples, range(6), multiple=multiple)
    parts = [
        build_micro_batch(samples, range(6), multiple=multiple, cp_size=cp, cp_rank=r)
        for r in range(cp)
    ]
    for name in ("tokens", "labels", "loss_mask", "position_ids", "advantages", "old_logprobs"):
        assert torch.equal(_unsplit(parts, name), getattr(ref, name)), name
    # chunk layout: rank r holds chunks r and 2cp-1-r of each sequence
    cu = ref.cu_seqlens_padded.tolist()
    for r, mb in enumerate(parts):
        offset = 0
        for start, end in zip(cu[:-1], cu[1:]):
            chunk = (end - start) // (2 * cp)
            expect = list(range(start + r * chunk, start + (r + 1) * chunk)) + list(
                range(start + (2 * cp - 1 - r) * chunk, start + (2 * cp - r) * chunk)
            )
            assert mb.global_positions[offset : offset + 2 * chunk].tolist() == expect
            offset += 2 * chunk


def test_tail_padding_not_divisible_by_2cp():
    """Lengths like 7 with cp=2 pad to 8; pad tokens carry no loss and labels stay within the sequence."""
    s = [TrainSample(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7], advantage=1.0)]
    parts = [build_micro_batch(s, [0], multiple=4, cp_size=2, cp_rank=r) for r in range(2)]
    assert parts[0].cu_seqlens_padded.tolist() == [0, 8]
    assert parts[0].cu_seqlens.tolist() == [0, 7]
    mask = _unsplit(parts, "loss_mask")
    labels = _unsplit(parts, "labels")
    assert mask.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert labels[2:6].tolist() == [4, 5, 6, 7]
    assert sum(int(p.loss_mask.sum()) for p in parts) == 4


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_token_counts_not_scaled_by_cp(cp):
    samples = _samples(9, seed=1)
    total = sum(len(s.response_ids) for s in samples)
    batches = [
        pack_batch(samples, max_tokens_per_microbatch=64, cp_size=cp, cp_rank=r) for r in range(cp)
    ]
    for b in batches:
        assert b.global_num_loss_tokens == total
        assert sum(mb.num_loss_tokens for mb in b.micro_batches) == total
    local = sum(float(mb.loss_mask.sum()) for b in batches for mb in b.micro_batches)
    assert local == total


@pytest.mark.parametrize(
    "dp,cp,tp,sp", [(1, 1, 1, False), (2, 1, 2, True), (3, 2, 2, True), (2, 2, 1, False)]
)
def test_dp_balanced_equal_microbatch_counts(dp, cp, tp, sp):
    samples = _samples(17, seed=dp * 10 + cp, max_len=60)
    multiple = pad_multiple(cp, tp, sp)
    per_rank = [
        pack_batch(
            samples,
            max_tokens_per_microbatch=80,
            dp_size=dp,
            dp_rank=d,
            cp_size=cp,
            tp_size=tp,
            sequence_parallel=sp,
            microbatch_multiple=2,
        )
        for d in range(dp)
    ]
    counts = {len(b.micro_batches) for b in per_rank}
    assert len(counts) == 1 and counts.pop() % 2 == 0
    seen = sorted(i for b in per_rank for mb in b.micro_batches for i in mb.sample_ids)
    assert seen == list(range(17)), "every sample exactly once across DP ranks"
    for b in per_rank:
        for mb in b.micro_batches:
            lens = (mb.cu_seqlens_padded[1:] - mb.cu_seqlens_padded[:-1]).tolist()
            assert all(n % multiple == 0 for n in lens)
            assert mb.num_padded_tokens <= 80 * cp
            if sp:
                assert mb.num_local_tokens % tp == 0
            if not mb.sample_ids:
                assert float(mb.loss_mask.sum()) == 0.0  # dummy micro-batch contributes nothing


def test_balance_is_balanced():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5]
    a = balance_across_dp(lengths, 2)
    loads = [sum(lengths[i] for i in ids) for ids in a]
    # longest first onto the lighter rank: 100 | 90, 80 | 10, 10, 10, 5, 5 (round-robin: 195 / 115)
    assert sorted(loads) == [140, 170]
    assert sorted(i for ids in a for i in ids) == list(range(len(lengths)))


def test_over_budget_raises_value_error():
    s = [TrainSample(prompt_ids=list(range(1, 50)), response_ids=[1, 2])]
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        pack_batch(s, max_tokens_per_microbatch=16)


def test_invalid_records():
    with pytest.raises(ValueError, match="prompt_ids"):
        TrainSample(prompt_ids=[], response_ids=[1])
    with pytest.raises(ValueError, match="old_logprobs"):
        TrainSample(prompt_ids=[1], response_ids=[1, 2], old_logprobs=[0.0])
    with pytest.raises(ValueError, match="advantage"):
        TrainSample(prompt_ids=[1], response_ids=[1, 2], advantage=[0.0])


def test_response_values_roundtrip_with_cp():
    samples = _samples(4, seed=3)
    parts = [
        build_micro_batch(samples, [0, 2, 3], multiple=4, cp_size=2, cp_rank=r) for r in range(2)
    ]
    full = _unsplit(parts, "old_logprobs")
    got = response_values(parts[0], full)
    for sid in (0, 2, 3):
        assert torch.allclose(got[sid], torch.tensor(samples[sid].old_logprobs))


def test_cp_split_index_rejects_bad_length():
    with pytest.raises(ValueError):
        cp_split_index([0, 6], 2, 0)


def test_equal_length_packs_for_fixed_pipeline_shapes():
    samples = _samples(11, seed=5)
    per_rank = [
        pack_batch(samples, max_tokens_per_microbatch=48, dp_size=2, dp_rank=d, cp_size=2, cp_rank=c,
                   equal_length=True)
        for d in range(2) for c in range(2)
    ]  # fmt: skip
    sizes = {mb.num_padded_tokens for b in per_rank for mb in b.micro_batches}
    assert len(sizes) == 1
    total = sum(float(mb.loss_mask.sum()) for b in per_rank for mb in b.micro_batches)
    assert total == sum(len(s.response_ids) for s in samples)
