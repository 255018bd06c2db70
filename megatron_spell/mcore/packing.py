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

Shared prefix (`shared_prefix=True`, `train.shared_prefix`): samples whose `prompt_ids` are identical (a
responder group's n answers, a verifier group's votes) form one *unit*, packed as one THD sequence

    prompt[:-1] | prompt[-1], r_1[:-1] | prompt[-1], r_2[:-1] | ... | padding

The prompt minus its last token is stored once (segment 0); response i is segment i+1 and starts with its own
copy of the last prompt token, so that every position predicts exactly one response token (labels, loss mask,
advantages and log-probs keep their per-position layout; the last response token predicts nothing and is
dropped). Positions of segment i run P-1, P, ..., P+R_i-2, exactly the positions these tokens have in the
unshared sequence (P = prompt length). The attention (`attention.PackedCPAttention`, given
`unit_segments`) lets segment i see segment 0 and itself, causally, never a sibling; padding is one more
segment. A unit costs P-1 + sum R_i tokens instead of n*P + sum R_i. Units are split for CP, balanced over
DP and binned by that real cost; a unit over the micro-batch budget is split into several units that each
carry the prompt and a subset of the responses (first-fit decreasing); a part left with one response is
packed as an ordinary sequence (counted in `num_unshared_fallback`).

Routing replay (MoE, `train.routing_replay`): `MicroBatch.routing` holds this CP rank's rows of the
rollout's expert choice, laid out like the tokens. The caller gives, per unit, the CP-local rows of
the padded unit (mcore/routing_exchange.py builds them: in a shared unit the prompt[:-1] rows once,
then each response segment's own rows of prompt[-1] and r_i[:-1]); -1 where there is none.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_NO_LABEL = 0  # label value at positions without a target (masked out; any valid id works)


def routing_rows(routing: Any, num_tokens: int) -> torch.Tensor:
    """A sample's routing as int16 [num_tokens, MoE layers, top-k], -1 where there is none."""
    t = torch.as_tensor(routing)
    if t.dtype == torch.uint8:
        t = torch.where(t == 255, -1, t.to(torch.int16))
    t = t.to(torch.int16)
    if t.dim() != 3 or t.shape[0] != num_tokens:
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "response_ids", tuple(int(t) for t in self.response_ids))
        n = len(self.response_ids)
        if self.routing is not None:
            object.__setattr__(self, "routing", routing_rows(self.routing, self.num_tokens))
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
    # per unit (THD sequence): segment boundaries relative to its start, (0, end of the shared prompt,
    # end of response 1, ..., padded length); None when every unit is an ordinary sequence
    unit_segments: tuple[tuple[int, ...], ...] | None = None
    # int64 [padded pack]: RoPE position of every token of the unsplit pack (None: 0.. per sequence)
    rope_positions: torch.Tensor | None = None
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
    # shared prefix: units holding more than one response, extra units made by splitting a group over the
    # micro-batch budget, group parts packed as an ordinary sequence, padded tokens through the model
    num_shared_units: int = 0
    num_split_units: int = 0
    num_unshared_fallback: int = 0
    global_num_tokens: int = 0


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


def response_positions(prompt_len: int, response_len: int) -> torch.Tensor:
    """RoPE positions of a response segment of a shared unit: those of the last prompt token and of the
    first `response_len - 1` response tokens in the unshared sequence."""
    return torch.arange(prompt_len - 1, prompt_len - 1 + response_len, dtype=torch.int64)


def _shared_unit_fields(
    unit: Sequence[TrainSample], length: int, pad_id: int
) -> tuple[dict[str, torch.Tensor], tuple[int, ...], list[int]]:
    """Full per-position fields of one shared unit padded to `length`, its segment boundaries and the
    start of every sample's response segment (see the module docstring for the layout)."""
    prompt = unit[0].prompt_ids
    p = len(prompt)
    head = p - 1  # tokens stored once
    out = {
        "tokens": torch.full((length,), pad_id, dtype=torch.int64),
        "position_ids": torch.zeros(length, dtype=torch.int64),
        "labels": torch.full((length,), _NO_LABEL, dtype=torch.int64),
        "loss_mask": torch.zeros(length),
        "advantages": torch.zeros(length),
        "seq_num_loss_tokens": torch.zeros(length),
        "old_logprobs": torch.zeros(length),
        "ref_logprobs": torch.zeros(length),
    }
    out["tokens"][:head] = torch.tensor(prompt[:head], dtype=torch.int64)
    out["position_ids"][:head] = torch.arange(head)
    bounds, starts, c = [0, head], [], head
    for s in unit:
        r = len(s.response_ids)
        starts.append(c)
        if r == 0:
            continue
        seg = slice(c, c + r)
        out["tokens"][seg] = torch.tensor((prompt[-1], *s.response_ids[:-1]), dtype=torch.int64)
        out["position_ids"][seg] = response_positions(p, r)
        out["labels"][seg] = torch.tensor(s.response_ids, dtype=torch.int64)
        out["loss_mask"][seg] = 1.0
        out["advantages"][seg] = torch.as_tensor(s.advantage, dtype=torch.float32)
        out["seq_num_loss_tokens"][seg] = float(r)
        for name in ("old_logprobs", "ref_logprobs"):
            if getattr(s, name) is not None:
                out[name][seg] = torch.tensor(getattr(s, name), dtype=torch.float32)
        c += r
        bounds.append(c)
    # padding: one more segment (it sees the prompt and itself, nothing sees it)
    out["position_ids"][c:] = torch.arange(c, length)
    if length > c:
        bounds.append(length)
    return out, tuple(bounds), starts


def build_micro_batch(
    samples: Sequence[TrainSample],
    sample_ids: Sequence[int],
    *,
    multiple: int,
    cp_size: int = 1,
    cp_rank: int = 0,
    pad_id: int = 0,
    pad_to: int | None = None,
    units: Sequence[Sequence[int]] | None = None,
    routing: Sequence[torch.Tensor | None] | None = None,
) -> MicroBatch:
    """THD-pack `samples` (the ones listed in `sample_ids`) and keep this CP rank's share.

    An empty `sample_ids` gives a dummy micro-batch: one pad sequence of `multiple` tokens, zero loss mask.
    `pad_to` (a multiple of `multiple`) appends one pad sequence so the pack has exactly that many tokens.
    `units` partitions `sample_ids` into packed sequences: a unit of several samples (which must share
    `prompt_ids`) is packed with the prompt once (module docstring); default: one sample per unit.
    `routing`, one entry per unit: this CP rank's rows of the padded unit (None: no routing).
    """
    if units is None:
        units = [[i] for i in sample_ids]
    units = [list(u) for u in units if u]
    order = [i for u in units for i in u]
    if sorted(order) != sorted(sample_ids):
        raise ValueError("build_micro_batch: units must partition sample_ids")
    seqs = [samples[i] for i in order]
    fields, lengths, padded, segments, spans = [], [], [], [], []
    offset = 0
    for u in units:
        group = [samples[i] for i in u]
        if len(group) == 1:
            s = group[0]
            n = s.num_tokens
            length = padded_length(n, multiple)
            fields.append(_sequence_fields(s, length, pad_id))
            p = len(s.prompt_ids)
            spans.append((offset + p - 1, offset + p - 1 + len(s.response_ids)))
            segments.append((0, length))
        else:
            if any(s.prompt_ids != group[0].prompt_ids for s in group):
                raise ValueError("build_micro_batch: the samples of a shared unit differ in prompt")
            n = len(group[0].prompt_ids) - 1 + sum(len(s.response_ids) for s in group)
            length = padded_length(n, multiple)
            f, bounds, starts = _shared_unit_fields(group, length, pad_id)
            fields.append(f)
            spans.extend(
                (offset + a, offset + a + len(s.response_ids)) for s, a in zip(group, starts)
            )
            segments.append(bounds)
        lengths.append(n)
        padded.append(length)
        offset += length
    dummy = TrainSample(prompt_ids=(pad_id,), response_ids=())
    if not seqs:  # a dummy micro-batch: one pad sequence
        fields.append(_sequence_fields(dummy, multiple, pad_id))
        lengths, padded, segments = [1], [multiple], [(0, multiple)]
    if pad_to is not None and pad_to > sum(padded):
        extra = pad_to - sum(padded)
        if extra % multiple:
            raise ValueError(f"pad_to={pad_to} is not a multiple of {multiple}")
        fields.append(_sequence_fields(dummy, extra, pad_id))
        lengths, padded = [*lengths, 1], [*padded, extra]
        segments.append((0, extra))
    full = {k: torch.cat([f[k] for f in fields]) for k in fields[0]}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_padded = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    index = cp_split_index(cu_padded.tolist(), cp_size, cp_rank)
    local = {k: v[index] for k, v in full.items()}
    has_ref = bool(seqs) and all(s.ref_logprobs is not None for s in seqs)
    shared = any(len(b) > 2 for b in segments)
    local_routing = None
    if routing is not None and any(r is not None for r in routing):
        local_routing = _pack_routing(routing, padded, cp_size, len(index))
    return MicroBatch(
        tokens=local["tokens"],
        position_ids=local["position_ids"],
        labels=local["labels"],
        loss_mask=local["loss_mask"],
        advantages=local["advantages"],
        old_logprobs=local["old_logprobs"],
        ref_logprobs=local["ref_logprobs"] if has_ref else None,
        seq_num_loss_tokens=local["seq_num_loss_tokens"],
        global_positions=index,
        cu_seqlens=cu,
        cu_seqlens_padded=cu_padded,
        max_seqlen=max(padded),
        sample_ids=tuple(order),
        num_loss_tokens=sum(len(s.response_ids) for s in seqs),
        response_spans=tuple(spans),
        unit_segments=tuple(segments) if shared else None,
        rope_positions=full["position_ids"] if shared else None,
        routing=local_routing,
    )


def _pack_routing(
    per_unit: Sequence[torch.Tensor | None], padded: Sequence[int], cp_size: int, total: int
) -> torch.Tensor:
    """The units' CP-local rows in pack order, -1 for units without routing and pad sequences.

    `cp_split_index` keeps each sequence's two chunks in turn, so the local rows of a pack are the
    local rows of its sequences, concatenated."""
    shape = next(tuple(r.shape[1:]) for r in per_unit if r is not None)
    out = torch.full((total, *shape), -1, dtype=torch.int16)
    start = 0
    for k, n in enumerate(padded):
        rows = per_unit[k] if k < len(per_unit) else None
        local = n // cp_size
        if rows is not None:
            if tuple(rows.shape) != (local, *shape):
                raise ValueError(
                    f"routing of unit {k}: shape {tuple(rows.shape)}, expected {(local, *shape)} "
                    f"(the CP-local rows of {n} padded tokens at cp={cp_size})"
                )
            out[start : start + local] = rows
        start += local
    return out


def plan_units(
    samples: Sequence[TrainSample], *, multiple: int, budget: int
) -> tuple[list[list[int]], int, int]:
    """Group samples with identical prompts into shared units that fit `budget` padded tokens.

    Returns the units (lists of sample ids, in order of first appearance), how many extra units the
    budget split made and how many parts of a group were left with one response (packed as an ordinary
    sequence). A group over the budget is split first-fit decreasing by response length into parts
    that each carry the prompt.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.prompt_ids, []).append(i)
    units: list[list[int]] = []
    split = fallback = 0
    for prompt, ids in groups.items():
        head = len(prompt) - 1
        if (
            len(ids) == 1
            or padded_length(head + sum(len(samples[i].response_ids) for i in ids), multiple)
            <= budget
        ):
            units.append(ids)
            continue
        parts: list[list[int]] = []
        loads: list[int] = []
        for i in sorted(ids, key=lambda i: (-len(samples[i].response_ids), i)):
            r = len(samples[i].response_ids)
            for k, load in enumerate(loads):
                if padded_length(head + load + r, multiple) <= budget:
                    parts[k].append(i)
                    loads[k] += r
                    break
            else:
                parts.append([i])
                loads.append(r)
        split += len(parts) - 1
        fallback += sum(1 for p in parts if len(p) == 1)
        units.extend(sorted(p) for p in parts)
    return units, split, fallback


def unit_cost(samples: Sequence[TrainSample], unit: Sequence[int], multiple: int) -> int:
    """Padded tokens of a unit through the model: P + R for one sample, P - 1 + sum R for a shared one."""
    if len(unit) == 1:
        return padded_length(samples[unit[0]].num_tokens, multiple)
    head = len(samples[unit[0]].prompt_ids) - 1
    return padded_length(head + sum(len(samples[i].response_ids) for i in unit), multiple)


@dataclass(frozen=True)
class BatchPlan:
    """The global layout of a batch: units, their padded lengths and their DP ranks (every rank
    computes the same)."""

    # sample ids per unit (one THD sequence each)
    units: list[list[int]]
    # padded tokens of each unit (its THD sequence length)
    costs: list[int]
    # unit indices per DP rank
    assignment: list[list[int]]
    multiple: int
    budget: int
    num_split: int = 0
    num_fallback: int = 0


def plan_batch(
    samples: Sequence[TrainSample],
    *,
    max_tokens_per_microbatch: int,
    dp_size: int = 1,
    cp_size: int = 1,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    shared_prefix: bool = False,
) -> BatchPlan:
    """Units (shared prefix or one sample each), their padded lengths and the DP balance."""
    if not samples:
        raise ValueError("pack_batch got no samples: the update batch is empty")
    if max_tokens_per_microbatch <= 0:
        raise ValueError(
            f"train.max_tokens_per_microbatch must be > 0, got {max_tokens_per_microbatch}"
        )
    multiple = pad_multiple(cp_size, tp_size, sequence_parallel)
    budget = max_tokens_per_microbatch * cp_size
    if shared_prefix:
        units, num_split, num_fallback = plan_units(samples, multiple=multiple, budget=budget)
    else:
        units, num_split, num_fallback = [[i] for i in range(len(samples))], 0, 0
    costs = [unit_cost(samples, u, multiple) for u in units]
    assignment = balance_across_dp(costs, dp_size)
    return BatchPlan(units, costs, assignment, multiple, budget, num_split, num_fallback)


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
    shared_prefix: bool = False,
    plan: BatchPlan | None = None,
    routing: Mapping[int, torch.Tensor] | None = None,
) -> PackedBatch:
    """Plan the whole global batch (same result on every rank) and build this rank's micro-batches.

    `max_tokens_per_microbatch` counts padded tokens per CP rank (a pack holds up to that times cp tokens).
    `equal_length` pads every micro-batch of every rank to the longest pack (a fixed pipeline tensor shape).
    `shared_prefix` packs samples with identical prompts as shared units (module docstring).
    `plan`: the `plan_batch` of these arguments, when the caller has it already. `routing` (routing
    replay): {unit index of the plan: this CP rank's rows of the padded unit} for this DP rank's units.
    """
    if plan is None:
        plan = plan_batch(
            samples,
            max_tokens_per_microbatch=max_tokens_per_microbatch,
            dp_size=dp_size,
            cp_size=cp_size,
            tp_size=tp_size,
            sequence_parallel=sequence_parallel,
            shared_prefix=shared_prefix,
        )
    units, costs, assignment = plan.units, plan.costs, plan.assignment
    multiple, budget = plan.multiple, plan.budget
    num_split, num_fallback = plan.num_split, plan.num_fallback
    bins_per_rank = [pack_into_bins(ids, costs, budget) for ids in assignment]
    num_micro = max(len(b) for b in bins_per_rank)
    num_micro = -(-num_micro // microbatch_multiple) * microbatch_multiple
    my_bins = bins_per_rank[dp_rank] + [[]] * (num_micro - len(bins_per_rank[dp_rank]))
    pad_to = None
    if equal_length:
        pad_to = max(sum(costs[i] for i in b) for bins in bins_per_rank for b in bins)
    micro = []
    for b in my_bins:
        my_units = [units[u] for u in b]
        rows = None if routing is None else [routing.get(u) for u in b]
        micro.append(
            build_micro_batch(
                samples,
                [i for u in my_units for i in u],
                multiple=multiple,
                cp_size=cp_size,
                cp_rank=cp_rank,
                pad_id=pad_id,
                pad_to=pad_to,
                units=my_units,
                routing=rows,
            )
        )
    return PackedBatch(
        micro_batches=micro,
        global_num_loss_tokens=sum(len(s.response_ids) for s in samples),
        global_num_sequences=sum(1 for s in samples if s.response_ids),
        dp_assignment=tuple(tuple(sorted(i for u in a for i in units[u])) for a in assignment),
        num_shared_units=sum(1 for u in units if len(u) > 1),
        num_split_units=num_split,
        num_unshared_fallback=num_fallback,
        global_num_tokens=sum(costs),
    )


def response_values(mb: MicroBatch, full_values: torch.Tensor) -> dict[int, torch.Tensor]:
    """Slice per-response-token values out of a full (unsplit, [padded pack]) per-position tensor.

    Returns {sample_id: values[len(response)]} for the samples of `mb`; the value at position p belongs to
    the label at p (the response token p+1), matching `loss_mask`.
    """
    return {sid: full_values[a:b] for sid, (a, b) in zip(mb.sample_ids, mb.response_spans)}
