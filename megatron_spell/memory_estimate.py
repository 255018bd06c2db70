"""Per-GPU memory of the two phases of a colocated step, from the HF config alone (`train --plan`,
docs/architecture.md "One step on one device").

The step alternates two peaks on every GPU (loop.update_and_sync):

* **training phase**: Megatron's bf16 parameters, the fp32 grad buffer (`grad_reduce_in_fp32`,
  mcore/optimizer.py), the optimizer state (fp32 main params and two Adam moments; with the
  DistributedOptimizer the dense part is sharded over DP x CP and the experts over the expert-DP
  ranks, world / (PP x EP x ETP)), the activations of one micro-batch (a micro-batch holds
  `train.max_tokens_per_microbatch` tokens per CP rank, mcore/packing.py; per SP slice divided by TP;
  full recompute keeps one layer input per layer plus one layer's working set, for a MoE layer its
  routed rows: tokens x top-k), the chunked log-prob pass, and what vLLM keeps while asleep
  (`rollout.sleep_level` 0: its whole share);
* **rollout phase**: vLLM's share of the device (`rollout.gpu_memory_utilization` x the device: its
  weights, KV cache and activations) plus what Megatron keeps during generation after the offloads
  (`train.offload_grads`, `train.offload_optimizer`, `train.offload_params`).

Both add a fixed allowance for CUDA contexts, NCCL communicators and workspaces (`OVERHEAD_GIB`).
The figures are an estimate for sizing a run, not a measurement: the run logs the measured memory
at every phase transition (`memory/<transition>/*`). `MemoryEstimate.check` fails when a phase
exceeds `parallel.device_memory_gib`, naming the knobs that lower it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_spell.config import Config
from megatron_spell.layout import Layout, ModelShape

GIB = float(1 << 30)
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OVERHEAD_GIB = 3.0
"""CUDA context, NCCL communicators of Megatron's and vLLM's groups, cuBLAS/TE workspaces."""
VLLM_ASLEEP_GIB = 1.0
"""What a sleeping vLLM engine keeps on the device (CUDA graphs' pools, its communicators)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per GPU of each phase, item by item, with each phase's "total"."""

    train: dict[str, float]
    rollout: dict[str, float]
    device_gib: float

    def lines(self) -> list[str]:
        return [
            f"memory per GPU, training phase (GiB): {_items(self.train)}",
            f"memory per GPU, rollout phase (GiB): {_items(self.rollout)}",
            f"device memory: {self.device_gib:.1f} GiB (parallel.device_memory_gib)",
        ]

    def check(self) -> None:
        """ValueError naming the knobs when a phase does not fit `parallel.device_memory_gib`."""
        dev = self.device_gib
        if self.train["total"] > dev:
            raise ValueError(
                f"the training phase needs ~{self.train['total']:.1f} GiB per GPU "
                f"({_items(self.train)}), more than parallel.device_memory_gib={dev:g}; lower "
                "train.max_tokens_per_microbatch, use train.recompute=full, keep "
                "train.use_distributed_optimizer=true, raise the parallel sizes (TP, PP, EP, CP), "
                "or set rollout.sleep_level to 1 or 2"
            )
        if self.rollout["total"] > dev:
            raise ValueError(
                f"the rollout phase needs ~{self.rollout['total']:.1f} GiB per GPU "
                f"({_items(self.rollout)}), more than parallel.device_memory_gib={dev:g}; lower "
                "rollout.gpu_memory_utilization, or set train.offload_grads / "
                "train.offload_optimizer / train.offload_params to true"
            )


def _items(d: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in d.items())


def estimate_memory(config: Config, shape: ModelShape, layout: Layout) -> MemoryEstimate:
    """Both phases' memory per GPU (see the module docstring)."""
    train, par = config.train, config.parallel
    wbytes = _BYTES[config.model.dtype]
    expert = 0
    if shape.num_experts:
        expert = shape.num_layers * shape.num_experts * 3 * shape.hidden_size
        expert *= shape.moe_ffn_hidden_size
    dense = shape.num_params() - expert
    local_dense = dense / (layout.tp * layout.pp)
    local_expert = expert / (layout.ep * layout.etp * layout.pp)
    local = local_dense + local_expert
    weights = local * wbytes
    grads = local * 4  # fp32 grad buffer
    # Adam's two fp32 moments, plus fp32 main params when the model is not fp32
    per_param = 8 + (4 if wbytes != 4 else 0)
    if train.use_distributed_optimizer:
        optim = per_param * (
            local_dense / (layout.dp * layout.cp) + local_expert / layout.expert_dp
        )
    else:
        optim = per_param * local
    tokens = train.max_tokens_per_microbatch / (layout.tp if par.sequence_parallel else 1)
    layers = shape.num_layers / layout.pp
    layer_input = tokens * shape.hidden_size * wbytes
    # one layer's forward + backward working set: ~16 hidden-sized tensors of the layer's tokens,
    # and for a MoE layer the routed rows (tokens x top-k) through fc1, the activation and fc2
    work = 16 * layer_input
    if shape.num_experts:
        ffn = shape.moe_ffn_hidden_size / layout.etp
        work += 2 * tokens * shape.moe_topk * (shape.hidden_size + 3 * ffn) * wbytes
    acts = (layers * layer_input if train.recompute == "full" else layers * work) + work
    logprob = train.logprob_chunk_size * shape.vocab_size / layout.tp * 4 * 3
    device = par.device_memory_gib
    vllm = config.rollout.gpu_memory_utilization * device
    asleep = vllm if config.rollout.sleep_level == 0 else VLLM_ASLEEP_GIB
    train_phase = {
        "weights": weights / GIB,
        "grads_fp32": grads / GIB,
        "optimizer": optim / GIB,
        "activations": acts / GIB,
        "logprob_chunk": logprob / GIB,
        "vllm_asleep": asleep,
        "overhead": OVERHEAD_GIB,
    }
    rollout_phase = {
        "vllm": vllm,
        "megatron_weights": 0.0 if train.offload_params else weights / GIB,
        "megatron_grads": 0.0 if train.offload_grads else grads / GIB,
        "megatron_optimizer": 0.0 if train.offload_optimizer else optim / GIB,
        "overhead": OVERHEAD_GIB,
    }
    train_phase["total"] = sum(train_phase.values())
    rollout_phase["total"] = sum(rollout_phase.values())
    return MemoryEstimate(train=train_phase, rollout=rollout_phase, device_gib=device)
