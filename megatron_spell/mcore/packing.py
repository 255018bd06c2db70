"""THD packing of trajectories into token-budgeted micro-batches, DP balancing and the CP split.

Implements the data side of the unified update (docs/spell-algorithm.md §1.7 and §5, "Dynamic
micro-batching"): the final batch of all three roles is

1. partitioned across data-parallel ranks, balanced by padded token count (longest-first onto the least
   loaded rank; every rank computes the same plan from the same global list, so no communication);
2. packed per rank into micro-batches of at most `max_tokens_per_microbatch` tokens *per rank* (i.e. a pack
   holds at most `max_tokens_per_microbatch * cp` tokens before the context-parallel split), first-fit
   decreasing;
3. equalised: every DP rank runs the same number of micro-batches (rounded up to `microbatch_multiple`, which
   the interleaved pipeline schedule needs); ranks with fewer get dummy micro-batches with an all-zero loss mask;
4. laid out in THD form: each sequence is padded to a multiple of `2*cp` (when cp > 1) times `tp` (when sequence
   parallel is on), labels are the next token *within* the sequence, computed on the full sequence before the
   CP split, and the loss mask covers the positions that predict response tokens only;
5. split for context parallelism with the load-balanced causal layout: CP rank r keeps chunks r and 2*cp-1-r of
   every sequence (the layout Megatron's THD RoPE and Transformer Engine expect), with position ids, labels and
   masks split the same way.

Token counts are global and never scaled by CP: `num_loss_tokens` of a micro-batch and of the batch count the
response tokens of the full sequences, whatever the CP size (the bug class of verl#6049, verl#4250).

Deviation from the reference (verl): sequences are balanced by padded token count rather than by
`sum(L^2)`-style compute estimates; dummy micro-batches instead of splitting real ones keep every pack intact.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_NO_LABEL = 0  # label value at positions without a target (masked out; any valid id works)


def routing_rows(routing: Any, num_tokens: int | None) -> torch.Tensor:
    """A sample's routing as int16 [num_tokens, MoE layers, top-k], -1 where there is none."""
    t = torch.as_tensor(routing)
    if t.dtype == torch.uint8:
        t = torch.where(t == 255, -1, t.to(torch.int16))
    t = t.to(torch.int16)
    if t.dim() != 3 or (num_tokens is not None and t.shape[0] != num_tokens):
        raise ValueError(
            f"TrainSample.routing has shape {tuple(t.shape)}; expected [{num_tokens} prompt + "
            "response tokens, MoE layers, top-k]"
        )
    return t


@dataclass(frozen=True)
class TrainSample:
    """One trajectory of the update batch (any role).

    `advantage` is a scalar (GRPO: one value per sequence) or one value per response token. `old_logprobs` and
    `ref_logprobs` hold one value per response token (the log-prob of that token at the rollout temperature);
    `old_logprobs=None` is allowed for a forward-only pass that computes them. `routing` (MoE routing
    replay) is the rollout's expert choice of every prompt and response token, [num_tokens, MoE
    layers, top-k] (numpy or torch; uint8 with 255 or signed with -1 where there is none).
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    advantage: float | tuple[float, ...] = 0.0
    old_logprobs: tuple[float, ...] | None = None
    ref_logprobs: tuple[float, ...] | None = None
    role: str = ""
    routing: Any = field(default=None, compare=False, repr=False)
    # `routing` holds only this CP rank's rows of the padded sample (routing_exchange.cp_local_rows)
    routing_local: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "response_ids", tuple(int(t) for t in self.response_ids))
        n = len(self.response_ids)
        if self.routing is not None:
            rows = None if self.routing_local else self.num_tokens
            object.__setattr__(self, "routing", routing_rows(self.routing, rows))
        if not self.prompt_ids:
            raise ValueError(
                "TrainSample.prompt_ids is empty: the first response token needs a prompt"
            )
        if not isinstance(self.advantage, int | float):
            object.__setattr__(self, "advantage", tuple(float(a) for a in self.advantage))
            if len(self.advantage) != n:
                raise ValueError(
                    f"TrainSample.advantage has {len(self.advantage)} values for {n} response tokens; "
                    "pass a scalar or one value per response token"
                )
        for name in ("old_logprobs", "ref_logprobs"):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(float(v) for v in values)
            object.__setattr__(self, name, values)
            if len(values) != n:
                raise ValueError(
                    f"TrainSample.{name} has {len(values)} values for {n} response tokens"
                )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class MicroBatch:
    """One THD-packed micro-batch as seen by one (dp, cp) rank. Per-token tensors are 1-D [t_local].

    `labels[p]` is the token that follows position p in its sequence; `loss_mask[p]` is 1.0 where that label is
    a response token. `global_positions[p]` is the index of local token p in the unsplit pack, which lets a
    forward-only pass reassemble per-token values across the CP group.
    """

    tokens: torch.Tensor  # int64 [t_local]
    position_ids: torch.Tensor  # int64 [t_local], restart at 0 in every sequence
    labels: torch.Tensor  # int64 [t_local]
    loss_mask: torch.Tensor  # float32 [t_local]
    advantages: torch.Tensor  # float32 [t_local]
    old_logprobs: torch.Tensor  # float32 [t_local] (0 where unknown)
    ref_logprobs: torch.Tensor | None  # float32 [t_local]
    seq_num_loss_tokens: torch.Tensor  # float32 [t_local]: response length of the token's sequence
    global_positions: torch.Tensor  # int64 [t_local]
    cu_seqlens: torch.Tensor  # int32 [n+1], unpadded global (unsplit) lengths
    cu_seqlens_padded: torch.Tensor  # int32 [n+1], padded global lengths
    max_seqlen: int  # longest padded sequence
    sample_ids: tuple[
        int, ...
    ]  # indices into the global sample list (empty for a dummy micro-batch)
    num_loss_tokens: (
        int  # response tokens of the full sequences in this micro-batch (CP-independent)
    )
    response_spans: tuple[
        tuple[int, int], ...
    ] = ()  # per sample: [start, end) label positions in the pack
    # routing replay: int16 [t_local, MoE layers, top-k] of this rank's tokens (-1: none), or None
    routing: torch.Tensor | None = None

    @property
    def num_local_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_padded_tokens(self) -> int:
        return int(self.cu_seqlens_padded[-1])


@dataclass(frozen=True)
class PackedBatch:
    """The micro-batches of one (dp, cp) rank plus the global counts the loss normalises by."""

    micro_batches: list[MicroBatch]
    global_num_loss_tokens: int  # response tokens of the whole global batch (all DP ranks)
    global_num_sequences: int  # sequences with at least one response token (for seq-mean)
    dp_assignment: tuple[tuple[int, ...], ...] = field(default=())  # sample ids per DP rank


def pad_multiple(cp_size: int, tp_size: int, sequence_parallel: bool) -> int:
    """Every packed sequence is padded to a multiple of this (2*cp for the CP split, tp for SP)."""
    return (2 * cp_size if cp_size > 1 else 1) * (tp_size if sequence_parallel else 1)


def padded_length(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def cp_split_index(cu_seqlens_padded: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Pack positions kept by `cp_rank`: chunks r and 2*cp-1-r of every (padded) sequence, in that order."""
    cu = [int(c) for c in cu_seqlens_padded]
    if cp_size == 1:
        return torch.arange(cu[-1], dtype=torch.int64)
    pieces = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"sequence length {length} is not a multiple of 2*cp={2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(pieces)


def balance_across_dp(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Longest-first assignment of samples to the least-loaded DP rank (deterministic; ties by rank)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    heap = [(0, r) for r in range(dp_size)]
    assignment: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        load, r = heapq.heappop(heap)
        assignment[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return [sorted(a) for a in assignment]


def pack_into_bins(ids: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing of samples `ids` (with padded `lengths[id]`) into bins of at most `budget`."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(ids, key=lambda i: (-lengths[i], i)):
        if lengths[i] > budget:
            raise ValueError(
                f"a sample of {lengths[i]} padded tokens exceeds the micro-batch budget of {budget} tokens; "
                "raise train.max_tokens_per_microbatch (it counts tokens per CP rank) or shorten "
                "rollout.max_prompt_length/max_response_length"
            )
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def _sequence_fields(sample: TrainSample, length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Full (unsplit) per-position fields of one sequence padded to `length`."""
    p, r = len(sample.prompt_ids), len(sample.response_ids)
    n = p + r
    tokens = torch.full((length,), pad_id, dtype=torch.int64)
    tokens[:n] = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.int64)
    labels = torch.full((length,), _NO_LABEL, dtype=torch.int64)
    labels[: n - 1] = tokens[1:n]
    mask = torch.zeros(length)
    mask[p - 1 : n - 1] = 1.0  # position p-1+j predicts response token j
    adv = torch.zeros(length)
    adv[p - 1 : n - 1] = torch.as_tensor(sample.advantage, dtype=torch.float32)
    out = {
        "tokens": tokens,
        "position_ids": torch.arange(length, dtype=torch.int64),
        "labels": labels,
        "loss_mask": mask,
        "advantages": adv,
        "seq_num_loss_tokens": torch.full((length,), float(r)),
    }
    for name in ("old_logprobs", "ref_logprobs"):
        values = torch.zeros(length)
        if getattr(sample, name) is not None:
            values[p - 1 : n - 1] = torch.tensor(getattr(sample, name), dtype=torch.float32)
        out[name] = values
    return out


def _pack_routing(
    seqs: Sequence[TrainSample], padded: Sequence[int], index: torch.Tensor, cp_size: int
) -> torch.Tensor | None:
    """This CP rank's routing rows of the pack (-1 on padding and where a sample has none), or None.

    Samples carry either all their rows (split here with the tokens' `index`) or, from the routing
    exchange, only this CP rank's rows of the padded sample, which are already in pack order
    (`cp_split_index` keeps each sequence's two chunks in turn).
    """
    have = [s for s in seqs if s.routing is not None]
    if not have:
        return None
    shape = tuple(have[0].routing.shape[1:])
    if any(tuple(s.routing.shape[1:]) != shape for s in have):
        raise ValueError("TrainSample.routing: samples of one batch differ in MoE layers or top-k")
    if any(s.routing_local for s in have):
        if not all(s.routing_local for s in have):
            raise ValueError("TrainSample.routing: a batch mixes CP-local and whole routing")
        parts = []
        for i, n in enumerate(padded):
            s = seqs[i] if i < len(seqs) else None
            if s is None or s.routing is None:
                parts.append(torch.full((n // cp_size, *shape), -1, dtype=torch.int16))
            elif s.routing.shape[0] != n // cp_size:
                raise ValueError(
                    f"TrainSample.routing: {s.routing.shape[0]} CP-local rows for a sample of "
                    f"{n} padded tokens at cp={cp_size}"
                )
            else:
                parts.append(s.routing)
        return torch.cat(parts)
    out = torch.full((sum(padded), *shape), -1, dtype=torch.int16)
    start = 0
    for s, n in zip(seqs, padded):
        if s.routing is not None:
            out[start : start + s.num_tokens] = s.routing
        start += n
    return out[index]


def build_micro_batch(
    samples: Sequence[TrainSample],
    sample_ids: Sequence[int],
    *,
    multiple: int,
    cp_size: int = 1,
    cp_rank: int = 0,
    pad_id: int = 0,
    pad_to: int | None = None,
) -> MicroBatch:
    """THD-pack `samples` (the ones listed in `sample_ids`) and keep this CP rank's share.

    An empty `sample_ids` gives a dummy micro-batch: one pad sequence of `multiple` tokens, zero loss mask.
    `pad_to` (a multiple of `multiple`) appends one pad sequence so the pack has exactly that many tokens.
    """
    seqs = [samples[i] for i in sample_ids]
    if not seqs:
        dummy = TrainSample(prompt_ids=(pad_id,), response_ids=())
        fields = [_sequence_fields(dummy, multiple, pad_id)]
        lengths, padded = [1], [multiple]
    else:
        lengths = [s.num_tokens for s in seqs]
        padded = [padded_length(n, multiple) for n in lengths]
        fields = [_sequence_fields(s, n, pad_id) for s, n in zip(seqs, padded)]
    if pad_to is not None and pad_to > sum(padded):
        extra = pad_to - sum(padded)
        if extra % multiple:
            raise ValueError(f"pad_to={pad_to} is not a multiple of {multiple}")
        dummy = TrainSample(prompt_ids=(pad_id,), response_ids=())
        fields.append(_sequence_fields(dummy, extra, pad_id))
        lengths, padded = [*lengths, 1], [*padded, extra]
    full = {k: torch.cat([f[k] for f in fields]) for k in fields[0]}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_padded = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    index = cp_split_index(cu_padded.tolist(), cp_size, cp_rank)
    local = {k: v[index] for k, v in full.items()}
    routing = _pack_routing(seqs, padded, index, cp_size)
    has_ref = bool(seqs) and all(s.ref_logprobs is not None for s in seqs)
    return MicroBatch(
        tokens=local["tokens"],
        position_ids=local["position_ids"],
        labels=local["labels"],
        loss_mask=local["loss_mask"],
        advantages=local["advantages"],
        old_logprobs=local["old_logprobs"],
        ref_logprobs=local["ref_logprobs"] if has_ref else None,
        seq_num_loss_tokens=local["seq_num_loss_tokens"],
        routing=routing,
        global_positions=index,
        cu_seqlens=cu,
        cu_seqlens_padded=cu_padded,
        max_seqlen=max(padded),
        sample_ids=tuple(sample_ids),
        num_loss_tokens=sum(len(s.response_ids) for s in seqs),
        response_spans=tuple(
            (c + len(s.prompt_ids) - 1, c + len(s.prompt_ids) - 1 + len(s.response_ids))
            for s, c in zip(seqs, cu_padded.tolist())
        ),
    )


def pack_batch(
    samples: Sequence[TrainSample],
    *,
    max_tokens_per_microbatch: int,
    dp_size: int = 1,
    dp_rank: int = 0,
    cp_size: int = 1,
    cp_rank: int = 0,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    microbatch_multiple: int = 1,
    pad_id: int = 0,
    equal_length: bool = False,
) -> PackedBatch:
    """Plan the whole global batch (same result on every rank) and build this rank's micro-batches.

    `max_tokens_per_microbatch` counts padded tokens per CP rank (a pack holds up to that times cp tokens).
    `equal_length` pads every micro-batch of every rank to the longest pack (a fixed pipeline tensor shape).
    """
    if not samples:
        raise ValueError("pack_batch got no samples: the update batch is empty")
    if max_tokens_per_microbatch <= 0:
        raise ValueError(
            f"train.max_tokens_per_microbatch must be > 0, got {max_tokens_per_microbatch}"
        )
    multiple = pad_multiple(cp_size, tp_size, sequence_parallel)
    lengths = [padded_length(s.num_tokens, multiple) for s in samples]
    assignment = balance_across_dp(lengths, dp_size)
    budget = max_tokens_per_microbatch * cp_size
    bins_per_rank = [pack_into_bins(ids, lengths, budget) for ids in assignment]
    num_micro = max(len(b) for b in bins_per_rank)
    num_micro = -(-num_micro // microbatch_multiple) * microbatch_multiple
    my_bins = bins_per_rank[dp_rank] + [[]] * (num_micro - len(bins_per_rank[dp_rank]))
    pad_to = None
    if equal_length:
        pad_to = max(sum(lengths[i] for i in b) for bins in bins_per_rank for b in bins)
    micro = [
        build_micro_batch(
            samples,
            ids,
            multiple=multiple,
            cp_size=cp_size,
            cp_rank=cp_rank,
            pad_id=pad_id,
            pad_to=pad_to,
        )
        for ids in my_bins
    ]
    return PackedBatch(
        micro_batches=micro,
        global_num_loss_tokens=sum(len(s.response_ids) for s in samples),
        global_num_sequences=sum(1 for s in samples if s.response_ids),
        dp_assignment=tuple(tuple(a) for a in assignment),
    )


def response_values(mb: MicroBatch, full_values: torch.Tensor) -> dict[int, torch.Tensor]:
    """Slice per-response-token values out of a full (unsplit, [padded pack]) per-position tensor.

    Returns {sample_id: values[len(response)]} for the samples of `mb`; the value at position p belongs to
    the label at p (the response token p+1), matching `loss_mask`.
    """
    return {sid: full_values[a:b] for sid, (a, b) in zip(mb.sample_ids, mb.response_spans)}
