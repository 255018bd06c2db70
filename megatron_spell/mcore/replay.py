"""MoE routing replay (R3) in the update's forward, through Megatron-Core's router replay.

A model built with `moe_enable_routing_replay=True` gives every `TopKRouter` a `RouterReplay`
(megatron/core/transformer/moe/router_replay.py): with action REPLAY_FORWARD its top-k is the
target indices set for the forward, and the routing weights are the router's own scores gathered at
those experts (so gradients still reach the router). `RoutingReplay` drives it per model chunk and
per micro-batch:

* Columns: the routing of a token is [MoE layers, top-k] in decoder-layer order; a router's column
  is the rank of its (global, 1-based) layer number among the MoE layers of `moe_layer_freq`, so
  pipeline stages and virtual chunks each take their own layers.
* Token layout: a micro-batch carries the routing of this CP rank's tokens (packed and CP-split
  exactly like the tokens, `packing.build_micro_batch`); with sequence parallelism the router sees
  this TP rank's contiguous 1/tp of them, which is the slice set here. Expert parallelism routes
  before the token dispatch, so it needs nothing.
* Rows without routing (-1: padding, the last response token, a prompt token vLLM served from a
  cache no request of the step computed) take the router's own top-k for that token.
* Activation recomputation re-runs the router in the backward pass: after each forward the action
  becomes REPLAY_BACKWARD, whose FIFO of targets (one per forward, in order) matches the order
  in which Megatron's schedules run the backward passes of a chunk's micro-batches.

`trace=True` keeps, per forward, the expert ids each router used with the pack positions of its
tokens (tests and tools/bench_mismatch.py compare them with the rollout's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_spell.mcore.parallel import ParallelContext


def moe_columns(config: Any) -> dict[int, int]:
    """{0-based decoder layer: routing column} of a TransformerConfig's MoE layers."""
    freq, n = config.moe_layer_freq, int(config.num_layers)
    pattern = list(freq) if isinstance(freq, list) else [int(i % int(freq) == 0) for i in range(n)]
    layers = [i for i, moe in enumerate(pattern) if moe]
    return {layer: c for c, layer in enumerate(layers)}


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model


def _partial_replay_topk(replay: Any) -> Any:
    """`RouterReplay.get_replay_topk` that falls back to the router's own choice on -1 rows."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    original = replay.get_replay_topk

    def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        action = replay.router_replay_action
        if action == RouterReplayAction.REPLAY_FORWARD:
            target = replay.target_topk_idx
        elif action == RouterReplayAction.REPLAY_BACKWARD:
            target = replay.replay_backward_list.pop(0)
        else:
            probs, idx = original(scores, topk, num_groups, group_topk, default_compute_topk)
            replay.spell_used = idx
            replay.spell_top1 = scores.argmax(dim=1)  # the router's own first choice
            return probs, idx
        target = target.to(scores.device)
        if target.shape != (scores.shape[0], topk):
            raise RuntimeError(
                f"routing replay: {tuple(target.shape)} target indices for {scores.shape[0]} "
                f"tokens and top-{topk} (layer {replay.layer_number})"
            )
        unknown = (target < 0).any(dim=1, keepdim=True)
        if bool(unknown.any()):
            _, own = default_compute_topk(
                scores, topk, num_groups=num_groups, group_topk=group_topk
            )
            target = torch.where(unknown, own, target)
        replay.spell_used = target
        replay.spell_top1 = None
        return scores.gather(1, target), target

    return get_replay_topk


class RoutingReplay:
    """Sets each chunk's router targets before its forward (see the module docstring)."""

    def __init__(self, models: list[Any], ctx: ParallelContext, *, trace: bool = False) -> None:
        self.ctx, self.trace = ctx, trace
        self.instances: dict[int, list[tuple[int, Any]]] = {}
        for model in models:
            chunk = _unwrap(model)
            columns = moe_columns(chunk.config)
            found = []
            for module in chunk.modules():
                replay = getattr(module, "router_replay", None)
                if replay is None or not hasattr(module, "topk"):
                    continue
                replay.get_replay_topk = _partial_replay_topk(replay)
                found.append((columns[int(replay.layer_number) - 1], replay))
            self.instances[id(model)] = found
        # per forward with `trace`: (pack positions [n], {column: expert ids [n, topk]}) and, when
        # the routers chose freely, {column: their first choice [n]}
        self.used: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
        self.top1: list[dict[int, torch.Tensor]] = []
        # False for a model built without moe_enable_routing_replay (dense, or the switch off)
        self.enabled = any(self.instances.values())

    def _router_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This TP rank's share of the CP-local rows, as the router sees them."""
        c = self.ctx
        if c.sequence_parallel and c.tp > 1:
            n = rows.shape[0] // c.tp
            return rows[c.tp_rank * n : (c.tp_rank + 1) * n]
        return rows

    def before_forward(self, model: Any, routing: torch.Tensor | None) -> None:
        """Replay `routing` ([CP-local tokens, MoE layers, topk], -1 = own) or route freely (None)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        found = self.instances.get(id(model), [])
        if routing is None:
            for _, replay in found:
                replay.clear_router_replay_action()
            return
        rows = self._router_rows(routing).to(self.ctx.device, torch.int64)
        for column, replay in found:
            replay.set_target_indices(rows[:, column].contiguous())
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after_forward(self, model: Any, positions: torch.Tensor) -> None:
        """Switch to the backward FIFO (recompute); with `trace`, keep what the routers used."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        found = self.instances.get(id(model), [])
        if self.trace and found:
            used = {c: r.spell_used.detach().cpu() for c, r in found}
            self.used.append((self._router_rows(positions.cpu()), used))
            self.top1.append({c: r.spell_top1.cpu() for c, r in found if r.spell_top1 is not None})
        for _, replay in found:
            if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    def clear(self) -> None:
        """Drop every target and action (after the forward/backward of a whole batch)."""
        for found in self.instances.values():
            for _, replay in found:
                replay.clear_indices()
                replay.clear_router_replay_action()


def pack_tokens(
    mb: Any, samples: Sequence[Any], units: Sequence[Sequence[int]]
) -> dict[int, tuple[int, int]]:
    """{position in the unsplit pack: (sample, token index in its prompt + response)} of `mb`'s
    tokens (for reading a trace). `units` are the plan's (`PolicyEngine.plan(samples).units`); a
    shared unit's prompt[:-1] positions name its first sample, whose rows the unit replays."""
    unit_of = {sid: tuple(u) for u in units for sid in u}
    spans = dict(zip(mb.sample_ids, mb.response_spans))
    cu = mb.cu_seqlens_padded.tolist()
    order: list[tuple[int, ...]] = []
    for sid in mb.sample_ids:
        if not order or order[-1] != unit_of[sid]:
            order.append(unit_of[sid])
    out: dict[int, tuple[int, int]] = {}
    for start, unit in zip(cu, order):
        if len(unit) == 1:
            out.update({start + t: (unit[0], t) for t in range(samples[unit[0]].num_tokens)})
            continue
        head = len(samples[unit[0]].prompt_ids) - 1
        out.update({start + t: (unit[0], t) for t in range(head)})
        for sid in unit:
            a, b = spans[sid]
            out.update({p: (sid, head + p - a) for p in range(a, b)})
    return out
