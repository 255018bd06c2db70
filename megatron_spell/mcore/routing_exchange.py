"""Moving each sample's rollout routing to the ranks that train it (MoE routing replay).

The routing of a completion stays in the process that generated it (`types.RoutedExperts`); the
loop's all-gather of the rounds carries only references. At the update every rank computes the
same DP plan (`packing.balance_across_dp` over the padded lengths, as `pack_batch` does), so the
owner of a sample knows which ranks train it: the ranks of that DP rank. Each of them gets only
the rows of its own CP chunks of the sample (`cp_local_rows`: the packing's load-balanced split of
the padded sequence, padding rows -1), sent point to point as one pickled payload per
(sender, receiver) pair; the ranks of one TP (and PP) group each receive their CP share. Nothing
is broadcast, and no rank ever receives another CP rank's or another DP rank's rows.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_spell.mcore.packing import cp_split_index, routing_rows

if TYPE_CHECKING:
    from megatron_spell.mcore.parallel import ParallelContext

log = logging.getLogger(__name__)


def cp_local_rows(routing: torch.Tensor, padded: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """A sample's rows [padded / cp, layers, topk] kept by `cp_rank` (-1 on padding)."""
    full = torch.full((padded, *routing.shape[1:]), -1, dtype=torch.int16)
    full[: routing.shape[0]] = routing
    return full[cp_split_index([0, padded], cp_size, cp_rank)]


def _exchange(outgoing: dict[int, dict[int, np.ndarray]], device: torch.device) -> list[dict]:
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
    refs: Sequence[Any],
    num_tokens: Sequence[int],
    padded: Sequence[int],
    assignment: Sequence[Sequence[int]],
    ctx: ParallelContext,
) -> dict[int, torch.Tensor]:
    """{sample id: this rank's CP-local rows} for the samples of this rank's DP share.

    `refs[i]`: sample i's `RoutedExperts` (or None); `padded[i]` its padded length and
    `assignment` the DP plan, both as `pack_batch` computes them. Collective over the world.
    """
    single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    me = 0 if single else dist.get_rank()
    coords = [(ctx.dp_rank, ctx.cp_rank)]
    if not single:
        coords = [None] * dist.get_world_size()
        dist.all_gather_object(coords, (ctx.dp_rank, ctx.cp_rank))
    dp_of = {sid: d for d, ids in enumerate(assignment) for sid in ids}
    outgoing: dict[int, dict[int, np.ndarray]] = {}
    lost = 0
    for sid, ref in enumerate(refs):
        if ref is None or ref.owner != me:
            continue
        if ref.data is None:
            lost += 1
            continue
        full = routing_rows(ref.data, num_tokens[sid])
        for dest, (dp_rank, cp_rank) in enumerate(coords):
            if dp_rank == dp_of[sid]:
                rows = cp_local_rows(full, padded[sid], ctx.cp, cp_rank).numpy()
                outgoing.setdefault(dest, {})[sid] = rows
    if lost:
        log.warning("routing replay: %d samples lost their routing (released); routed freely", lost)
    received = [outgoing.get(me, {})] if single else _exchange(outgoing, ctx.device)
    out: dict[int, torch.Tensor] = {}
    for part in received:
        out.update({sid: torch.from_numpy(rows) for sid, rows in part.items()})
    return out
