"""The rollout's routing laid out like the packed tokens, and moved to the ranks that train it (MoE
routing replay).

Layout. A packing unit (`packing.plan_batch`) takes its rows like its tokens: an ordinary sequence
takes its sample's rows; a shared-prefix unit `prompt[:-1] | prompt[-1], r_1[:-1] | ...` takes the
prompt[:-1] rows once, from its *source* (the first sample of the unit, in plan order, whose routing
is there), and for response segment i sample i's own rows of prompt[-1] and r_i[:-1]; padding -1.
With vLLM's prefix cache the group's prompt rows agree (rollout/routing.py fills a cached block from
the request that computed it); where they do not (e.g. a partial last block computed in different
batches), the source's rows are replayed for the whole group and the samples whose prompt[:-1] rows
differ from their source's are counted (`UnitRouting.num_prompt_differ`,
`train/routing_prompt_differ`). With one sample per unit this is the unshared layout.

Exchange. The routing of a completion stays in the process that generated it (`types.RoutedExperts`;
the loop's all-gather of the rounds carries only references). At the update every rank computes the
same plan (units, their padded lengths, their DP ranks), so the owner of a sample knows which ranks
train its unit: the ranks of that DP rank. Each of them gets only the sample's rows that fall into
its own CP chunks of the padded unit (the packing's load-balanced split), as (local row, rows) pairs
in one pickled payload per (sender, receiver), point to point; the ranks of one TP (and PP) group
each receive their CP share. Nothing is broadcast, and no rank receives another CP or DP rank's
rows. A 16-byte digest of each shared-unit sample's prompt rows is all-gathered with the ranks'
coordinates, so every rank agrees on each unit's source and on the count.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_spell.mcore.packing import BatchPlan, TrainSample, cp_split_index, routing_rows

if TYPE_CHECKING:
    from megatron_spell.mcore.parallel import ParallelContext

log = logging.getLogger(__name__)


@dataclass
class UnitRouting:
    """This rank's routing of its DP share: {unit index of the plan: rows [padded / cp, MoE layers,
    top-k] int16 of its CP chunks (-1: none)}, and the batch-wide count of shared-unit samples
    whose prompt rows differ from their unit's source."""

    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    num_prompt_differ: int = 0


def _head(samples: Sequence[TrainSample], unit: Sequence[int]) -> int:
    """Rows of the unit taken once from its source: prompt[:-1] when shared, none otherwise."""
    return len(samples[unit[0]].prompt_ids) - 1 if len(unit) > 1 else 0


def _contribution(
    samples: Sequence[TrainSample], unit: Sequence[int], sid: int, full: torch.Tensor, source: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the padded unit, their routing) that sample `sid` (routing `full`) supplies."""
    if len(unit) == 1:
        return torch.arange(full.shape[0]), full
    head = _head(samples, unit)
    start = head + sum(len(samples[j].response_ids) for j in unit[: list(unit).index(sid)])
    r = len(samples[sid].response_ids)
    pos, rows = [torch.arange(start, start + r)], [full[head : head + r]]
    if source:
        pos.insert(0, torch.arange(head))
        rows.insert(0, full[:head])
    return torch.cat(pos), torch.cat(rows)


def _digest(rows: torch.Tensor) -> bytes:
    return hashlib.blake2b(rows.contiguous().numpy().tobytes(), digest_size=16).digest()


def _sources(plan: BatchPlan, digests: dict[int, bytes]) -> tuple[dict[int, int], int]:
    """{shared unit: its source sample} among the samples with routing, and how many differ."""
    sources, differ = {}, 0
    for u, unit in enumerate(plan.units):
        have = [sid for sid in unit if sid in digests]
        if len(unit) > 1 and have:
            sources[u] = have[0]
            differ += sum(digests[sid] != digests[have[0]] for sid in have[1:])
    return sources, differ


def _local_rows(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[length]: the CP-local row of each row of a padded unit, -1 where another CP rank has it."""
    keep = cp_split_index([0, length], cp_size, cp_rank)
    out = torch.full((length,), -1, dtype=torch.int64)
    out[keep] = torch.arange(keep.numel())
    return out


def local_routing(
    samples: Sequence[TrainSample], plan: BatchPlan, cp_size: int, cp_rank: int, dp_rank: int
) -> UnitRouting:
    """The same layout from samples that carry their whole routing (`TrainSample.routing`)."""
    digests = {}
    for unit in plan.units:
        for sid in unit:
            if len(unit) > 1 and samples[sid].routing is not None:
                digests[sid] = _digest(samples[sid].routing[: _head(samples, unit)])
    sources, differ = _sources(plan, digests)
    out = UnitRouting(num_prompt_differ=differ)
    for u in plan.assignment[dp_rank]:
        unit = plan.units[u]
        have = [sid for sid in unit if samples[sid].routing is not None]
        if not have:
            continue
        shape = tuple(samples[have[0]].routing.shape[1:])
        full = torch.full((plan.costs[u], *shape), -1, dtype=torch.int16)
        for sid in have:
            pos, rows = _contribution(
                samples, unit, sid, samples[sid].routing, sources.get(u) == sid
            )
            full[pos] = rows
        out.rows[u] = full[cp_split_index([0, plan.costs[u]], cp_size, cp_rank)]
    return out


def _exchange(outgoing: dict[int, list], device: torch.device) -> list[list]:
    """Point-to-point: send outgoing[dest] to every dest, receive what each rank sent here."""
    world, me = dist.get_world_size(), dist.get_rank()
    payloads = {d: pickle.dumps(v) for d, v in outgoing.items() if d != me and v}
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    for d, p in payloads.items():
        sizes[d] = len(p)
    table = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(table, sizes)
    ops, inbox = [], []
    for src in range(world):
        n = int(table[src][me])
        if src != me and n:
            buf = torch.empty(n, dtype=torch.uint8, device=device)
            inbox.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, src))
    for d, p in payloads.items():
        buf = torch.frombuffer(bytearray(p), dtype=torch.uint8).to(device)
        ops.append(dist.P2POp(dist.isend, buf, d))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    received = [pickle.loads(buf.cpu().numpy().tobytes()) for buf in inbox]
    if outgoing.get(me):
        received.append(outgoing[me])
    return received


def exchange_routing(
    refs: Sequence[Any], samples: Sequence[TrainSample], plan: BatchPlan, ctx: ParallelContext
) -> UnitRouting:
    """This rank's `UnitRouting` of the batch `samples` packed by `plan` (collective over the world).

    `refs[i]`: sample i's `RoutedExperts` (or None), whose array only its owner holds."""
    single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    me = 0 if single else dist.get_rank()
    unit_of = {sid: u for u, unit in enumerate(plan.units) for sid in unit}
    mine: dict[int, torch.Tensor] = {}
    lost = 0
    for sid, ref in enumerate(refs):
        if ref is None or ref.owner != me:
            continue
        if ref.data is None:
            lost += 1
            continue
        mine[sid] = routing_rows(ref.data, samples[sid].num_tokens)
    if lost:
        log.warning("routing replay: %d samples lost their routing (released); routed freely", lost)
    digests = {
        sid: _digest(rows[: _head(samples, plan.units[unit_of[sid]])])
        for sid, rows in mine.items()
        if len(plan.units[unit_of[sid]]) > 1
    }
    coords = [(ctx.dp_rank, ctx.cp_rank, digests)]
    if not single:
        coords = [None] * dist.get_world_size()
        dist.all_gather_object(coords, (ctx.dp_rank, ctx.cp_rank, digests))
    sources, differ = _sources(plan, {k: v for _, _, d in coords for k, v in d.items()})
    dp_of = {u: d for d, units in enumerate(plan.assignment) for u in units}
    outgoing: dict[int, list] = {}
    for sid, full in mine.items():
        u = unit_of[sid]
        pos, rows = _contribution(samples, plan.units[u], sid, full, sources.get(u) == sid)
        for dest, (dp_rank, cp_rank, _) in enumerate(coords):
            if dp_rank != dp_of[u]:
                continue
            local = _local_rows(plan.costs[u], ctx.cp, cp_rank)[pos]
            keep = local >= 0
            if bool(keep.any()):
                item = (u, local[keep].numpy(), rows[keep].numpy())
                outgoing.setdefault(dest, []).append(item)
    received = [outgoing.get(me, [])] if single else _exchange(outgoing, ctx.device)
    out = UnitRouting(num_prompt_differ=differ)
    for part in received:
        for u, local, rows in part:
            if u not in out.rows:
                shape = (plan.costs[u] // ctx.cp, *rows.shape[1:])
                out.rows[u] = torch.full(shape, -1, dtype=torch.int16)
            out.rows[u][torch.from_numpy(local)] = torch.from_numpy(rows)
    return out
