"""The Megatron side of a SPELL run behind the loop's `Policy` interface (docs/spell-algorithm.md
§1.7 and §5).

`MegatronPolicy` builds the model chunks for this rank's layout from the HF config, loads the converted
Megatron checkpoint, wraps them in DDP with the (distributed) optimizer and the LR schedule, and offers:

* `update(batch)`: exactly one GRPO optimizer step on all three roles. Deviation (a speed-up with the same
  numbers): the batch is on-policy and gets one step, so the PPO old log-probs equal the current weights'
  log-probs; they are taken from the training pass itself (detached) instead of a forward-only recompute
  pass first, as verl does (`train.recompute_old_logprobs=true` restores that). The vLLM log-probs feed
  the train/infer mismatch metric and, when configured, the rollout correction (on the training pass
  only, mcore/rollout_correction.py);
* `export_weights()`: (HF name, full tensor) pairs gathered over PP/TP/EP, streamed bucket by bucket;
* `export_hf(dir)`: the same stream written as a Hugging Face directory (the end of a run,
  `checkpoint.export_hf`);
* `save(dir)` / `load(dir)`: model, optimizer and scheduler in one Megatron distributed checkpoint, loadable
  at the same layout (optimizer state resharding follows Megatron's `dp_reshardable` format).

Decision (D10): the reference computes reference log-probs with `kl_loss_coef = 0`, wasted
compute. We keep no reference model; the config rejects `train.kl_coef != 0` until a reference copy is
added.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_spell.config import Config
from megatron_spell.mcore import offload
from megatron_spell.mcore.attention import core_attention_class
from megatron_spell.mcore.checkpoint import DTYPES, load_checkpoint
from megatron_spell.mcore.export import export_hf_weights, write_hf_dir
from megatron_spell.mcore.model import build_model, use_transformer_engine
from megatron_spell.mcore.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megatron_spell.mcore.packing import TrainSample
from megatron_spell.mcore.parallel import ParallelContext
from megatron_spell.mcore.routing_exchange import UnitRouting, exchange_routing
from megatron_spell.mcore.train_step import PolicyEngine, recompute_overrides
from megatron_spell.types import RoutedExperts, TrainBatch, Trajectory

log = logging.getLogger(__name__)


def to_sample(t: Trajectory, old_logprobs: tuple[float, ...] | None = None) -> TrainSample:
    return TrainSample(
        prompt_ids=t.prompt_ids,
        response_ids=t.completion.token_ids,
        advantage=t.advantage,
        old_logprobs=old_logprobs,
        role=t.role.value,
    )


class MegatronPolicy:
    """Model, optimizer and update for one rank (see the module docstring)."""

    def __init__(self, config: Config, ctx: ParallelContext, hf_config: Any) -> None:
        self.config, self.ctx, self.hf_config = config, ctx, hf_config
        dtype = DTYPES[config.model.dtype]
        use_te = use_transformer_engine(config.model.attention_backend)
        self.chunks = build_model(
            hf_config,
            ctx,
            dtype=dtype,
            core_attention=core_attention_class(use_te),
            config_overrides={
                **recompute_overrides(config.train.recompute),
                **({"moe_enable_routing_replay": True} if config.train.routing_replay else {}),
            },
            use_te=use_te,
        )
        load_checkpoint(self.chunks, config.model.load)
        train = config.train
        if train.use_distributed_optimizer and not torch.cuda.is_available():
            # megatron-core 0.19's DistributedOptimizer only wraps CUDA tensors; on CPU (tests, the demo)
            # the plain Megatron optimizer is used, which gives the same update.
            log.info("CPU run: train.use_distributed_optimizer ignored (needs CUDA tensors)")
            train = dataclasses.replace(train, use_distributed_optimizer=False)
        self.ddp = wrap_ddp(
            self.chunks, ctx, use_distributed_optimizer=train.use_distributed_optimizer
        )
        self.optimizer = build_optimizer(self.ddp, train, ctx)
        self.scheduler = build_scheduler(self.optimizer, train)
        shared_prefix = train.shared_prefix and not use_te
        if train.shared_prefix and use_te:
            # TE's fused attention takes one causal mask per THD sequence; the shared-prefix mask
            # needs PackedCPAttention (model.attention_backend=local)
            log.warning(
                "train.shared_prefix=true with Transformer Engine attention: packing unshared; "
                "set model.attention_backend=local to share prompts"
            )
        self.engine = PolicyEngine(
            self.ddp,
            ctx,
            train,
            temperature=config.rollout.temperature,
            vocab_size=int(hf_config.vocab_size),
            pad_token_id=int(getattr(hf_config, "pad_token_id", None) or 0),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            shared_prefix=shared_prefix,
        )

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the batch; reports the train/infer log-prob mismatch with vLLM's.

        The batch is on-policy (one step per batch, docs/spell-algorithm.md §1.7), so by default the
        old log-probs are the current ones taken inside the training pass;
        `train.recompute_old_logprobs=true` recomputes them in a forward-only pass first, as the
        reference does (same values, one more forward pass).
        """
        trajs = list(batch.trajectories)
        try:
            return self._update(trajs)
        finally:
            RoutedExperts.release_all()  # this step's rollout routing is spent

    def _routing(self, trajs: list[Trajectory]) -> UnitRouting | None:
        """This rank's routing rows of its DP share (routing replay), laid out like the packs."""
        if not self.config.train.routing_replay:
            return None
        samples = [to_sample(t) for t in trajs]
        refs = [t.completion.routed_experts for t in trajs]
        return exchange_routing(refs, samples, self.engine.plan(samples), self.ctx)

    def _update(self, trajs: list[Trajectory]) -> dict[str, float]:
        r3 = self._routing(trajs)
        if self.config.train.recompute_old_logprobs:
            metrics = self._update_recomputed(trajs, r3)
        else:  # the engine compares its log-probs with the rollout's (vLLM's): mismatch, correction
            rollout = [
                t.completion.logprobs
                if len(t.completion.logprobs) == len(t.completion.token_ids)
                else None
                for t in trajs
            ]
            metrics = self.engine.train_step(
                [to_sample(t, lp) for t, lp in zip(trajs, rollout)], on_policy=True, routing=r3
            )
        return {k.split("/", 1)[1] if k.startswith("train/") else k: v for k, v in metrics.items()}

    def _update_recomputed(
        self, trajs: list[Trajectory], r3: UnitRouting | None
    ) -> dict[str, float]:
        """Forward-only recompute of the old log-probs, then the step; the mismatch is computed here."""
        old = self.engine.compute_logprobs([to_sample(t) for t in trajs], r3)
        diffs = [
            (o - torch.tensor(t.completion.logprobs, dtype=o.dtype)).abs()
            for t, o in zip(trajs, old)
            if len(t.completion.logprobs) == o.numel() and o.numel()
        ]
        metrics = self.engine.train_step(
            [to_sample(t, tuple(o.tolist())) for t, o in zip(trajs, old)], routing=r3
        )
        if diffs:
            flat = torch.cat(diffs)
            metrics["train/logprob_mismatch_mean"] = float(flat.mean())
            metrics["train/logprob_mismatch_max"] = float(flat.max())
        return metrics

    def export_weights(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of (HF name, full tensor) for the rollout engine (every rank gets every tensor)."""
        dtype = torch.float32 if self.config.model.dtype == "fp32" else torch.bfloat16
        return export_hf_weights(
            self.chunks,
            self.ctx,
            self.hf_config,
            bucket_mb=self.config.rollout.weight_sync_bucket_mb,
            dtype=dtype,
        )

    def export_hf(self, out_dir: str | Path) -> None:
        """Write the current weights as an HF directory in `model.dtype` (every rank calls it)."""
        write_hf_dir(
            self.chunks,
            self.ctx,
            self.hf_config,
            out_dir,
            hf_src=self.config.model.hf_dir,
            dtype=DTYPES[self.config.model.dtype],
        )

    # --- the device between phases (loop.update_and_sync, mcore/offload.py) ------------------------

    def onload(self) -> None:
        """Parameters, grads and optimizer state back on the device before the update (idempotent)."""
        offload.onload_params(self.ddp)
        offload.onload_grads(self.ddp)
        offload.onload_optimizer(self.optimizer)

    def offload_training_state(self) -> None:
        """After the step: free the spent grads (`train.offload_grads`) and move the optimizer state
        to host (`train.offload_optimizer`)."""
        if self.config.train.offload_grads:
            offload.offload_grads(self.ddp)
        if self.config.train.offload_optimizer:
            offload.offload_optimizer(self.optimizer)

    def offload_params(self) -> None:
        """After the weight sync: the parameters to host (`train.offload_params`)."""
        if self.config.train.offload_params:
            offload.offload_params(self.ddp)

    # --- checkpoints -------------------------------------------------------------------------------

    def _sharded_state(self) -> dict[str, Any]:
        keys = (
            ["model"] if len(self.chunks) == 1 else [f"model{i}" for i in range(len(self.chunks))]
        )
        model_sd = {k: c.sharded_state_dict() for k, c in zip(keys, self.chunks)}
        sd = dict(model_sd)
        sd["optimizer"] = self.optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
        sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def save(self, path: str | Path) -> None:
        """Write model + optimizer + scheduler (every rank calls it; `path` is shared)."""
        from megatron.core import dist_checkpointing

        Path(path).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self._sharded_state(), str(path))

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote. Adam's moments must exist before a sharded load fills them."""
        from megatron.core import dist_checkpointing

        self._init_optimizer_state()
        with torch.no_grad():
            loaded = dist_checkpointing.load(self._sharded_state(), str(path))
            keys = [k for k in loaded if k.startswith("model")]
            for k, chunk in zip(sorted(keys), self.chunks):
                chunk.load_state_dict(loaded[k], strict=True)
            self.optimizer.load_state_dict(loaded["optimizer"])
            self.scheduler.load_state_dict(loaded["scheduler"])

    def _init_optimizer_state(self) -> None:
        """Create Adam's exp_avg/exp_avg_sq (zeros) so that the sharded optimizer state can be loaded."""
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in inner:
            torch_opt = getattr(opt, "optimizer", opt)
            for group in torch_opt.param_groups:
                for p in group["params"]:
                    state = torch_opt.state[p]
                    if "exp_avg" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
