"""Megatron DDP wrapping, the (distributed) Adam optimizer and the LR schedule
(docs/spell-algorithm.md §5).

- `wrap_ddp`: Megatron's DistributedDataParallel around every model chunk, with
  `calculate_per_token_loss=True` so that DDP *sums* gradients over DP x CP (the loss is already divided by
  the global token count, see loss.py) and `finalize_model_grads` does no extra scaling.
- `build_optimizer`: `megatron.core.optimizer.get_megatron_optimizer` with AdamW (betas 0.9/0.999, weight
  decay 0.01, grad clip 1.0 by default), optionally the DistributedOptimizer. Both take the run's
  `train` section (`config.TrainConfig`).

  Deviation (kept on purpose): Megatron puts biases and 1-D parameters (norm weights) in param
  groups with `wd_mult = 0`, so they are not decayed; the reference (verl's FSDP AdamW over
  `module.parameters()`) decays every parameter by `weight_decay`. Not decaying biases and norm
  gains is the usual AdamW practice, and at lr 2e-6 and wd 0.01 the difference is ~2e-8 of a
  weight per step (tests/unit/mcore/test_optimizer.py checks the groups).
- `build_scheduler`: Megatron's `OptimizerParamScheduler` (constant LR 2e-6 with no warm-up by default, as the
  reference; warm-up + cosine available).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch.overrides import TorchFunctionMode

from megatron_spell.config import TrainConfig
from megatron_spell.mcore.parallel import ParallelContext

logger = logging.getLogger(__name__)


class _CudaTensorTypeNames(TorchFunctionMode):
    """`Tensor.type()` answers 'torch.cuda.FloatTensor' for CPU tensors while active.

    Workaround (CPU only, belongs in cpu_support): Megatron's optimizers sort parameters by comparing
    `param.type()` with CUDA type names and reject anything else, so the DistributedOptimizer cannot be
    built on CPU. Active only while the optimizer is constructed.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _finalize_without_token_scaling(model, num_tokens=None, pg_collection=None, **kwargs):
    """Grad all-reduce (DP x CP sum, SP norms, embeddings) without dividing by a token count."""
    del num_tokens
    return finalize_model_grads(model, None, pg_collection, **kwargs)


def wrap_ddp(
    chunks: list[torch.nn.Module], ctx: ParallelContext, *, use_distributed_optimizer: bool = True
) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP (grads reduced in fp32, summed over DP x CP)."""
    config = chunks[0].config
    config.calculate_per_token_loss = True  # before DDP: it fixes the gradient scaling factor
    config.finalize_model_grads_func = _finalize_without_token_scaling
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,  # Megatron-LM: only the first VPP chunk uses buckets
                pg_collection=ctx.pg_collection,
            )
        )
    return wrapped


def build_optimizer(
    ddp_chunks: list[DistributedDataParallel], cfg: TrainConfig, ctx: ParallelContext
) -> Any:
    """Megatron AdamW (fp32 params on CPU; bf16 params keep fp32 main weights on GPU)."""
    model_config = ddp_chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip,
        bf16=bool(model_config.bf16),
        fp16=bool(model_config.fp16),
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    mode = _CudaTensorTypeNames() if not torch.cuda.is_available() else contextlib.nullcontext()
    with mode:
        return get_megatron_optimizer(
            opt_config,
            ddp_chunks,
            # Megatron refuses its extra gloo copies of the DP groups together with an explicit
            # pg_collection. They serve only the dp_zero optimizer-state formats; our checkpoints use
            # dp_reshardable, and on CPU the groups themselves are gloo.
            use_gloo_process_groups=False,
            pg_collection=ctx.pg_collection,
        )


def build_scheduler(optimizer: Any, cfg: TrainConfig) -> OptimizerParamScheduler:
    """`train.lr_schedule` (constant or cosine over `train.total_steps`) after `lr_warmup_steps`."""
    decay_steps = max(cfg.total_steps, cfg.lr_warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_steps > 0 else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.lr_schedule != "constant" else cfg.lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
