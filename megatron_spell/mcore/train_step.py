"""One GRPO/PPO update and forward-only log-probs on Megatron-Core (docs/spell-algorithm.md §1.7 and
§5).

`PolicyEngine.train_step(samples)` performs exactly one optimizer step on the whole batch (ppo_epochs=1,
one mini-batch, as the reference):

1. `packing.pack_batch` plans the global batch (same plan on every rank), balances it over DP and builds this
   rank's THD micro-batches (CP-split);
2. Megatron's `get_forward_backward_func` runs them (no pipelining, 1F1B, or interleaved 1F1B with
   `batch_p2p_comm=False` on gloo, set by the model builder); the model's `output_processor` hook turns the
   final hidden states into response-token log-probs and entropies with `logprobs.chunked_logprobs`
   (vocab-parallel, chunked), so no [tokens, vocab] logits tensor is built;
3. `loss.policy_loss` with per-token weights normalised by the *global* response-token count (or sequence
   count for seq_mean); gradients are summed over DP x CP by Megatron DDP (optimizer.wrap_ddp);
4. non-finite loss or gradients on any rank skip the step everywhere (counted in `train/num_skipped_steps`);
   otherwise the optimizer clips and steps, and the LR scheduler advances.

`PolicyEngine.compute_logprobs(samples)` is the forward-only pass for old / reference log-probs: it returns
the per-response-token log-probs of every sample, on every rank, in input order.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_spell.config import TrainConfig
from megatron_spell.mcore.logprobs import chunked_logprobs
from megatron_spell.mcore.loss import policy_loss, token_weights
from megatron_spell.mcore.packing import (
    MicroBatch,
    PackedBatch,
    TrainSample,
    balance_across_dp,
    pack_batch,
    pad_multiple,
    padded_length,
    response_values,
)
from megatron_spell.mcore.parallel import ParallelContext
from megatron_spell.mcore.replay import RoutingReplay

logger = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "pg_loss", "clip_frac", "dual_clip_frac", "ppo_kl", "entropy", "kl")
_MISMATCH_KEYS = ("mismatch_sum", "mismatch_count")  # on-policy steps only (train_step)


def recompute_overrides(recompute: str) -> dict[str, Any]:
    """TransformerConfig overrides (build_model(config_overrides=...)) for train.recompute."""
    if recompute == "none":
        return {}
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    raise ValueError(f"train.recompute={recompute!r}: use none, full or selective")


@dataclass
class _Micro:
    """Per-micro-batch tensors handed from the forward step to the output processor and the loss."""

    mb: MicroBatch
    select: torch.Tensor  # local positions that predict response tokens
    labels: torch.Tensor
    weights: torch.Tensor | None = None
    old: torch.Tensor | None = None
    adv: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    # the loss's old log-probs are the current ones; `old` then holds the rollout's (mismatch metric only)
    on_policy: bool = False


class PolicyEngine:
    """Train step and forward-only log-probs for DDP-wrapped Megatron model chunks.

    `train` is the run's `train` section (loss, micro-batching, log-prob chunks). The rest is not in
    it: `temperature` is the rollout's (log-probs are taken of softmax(logits / temperature)),
    `vocab_size` the true (HF) vocabulary (padded output rows are masked) and `pad_token_id` fills
    the packs.
    """

    def __init__(
        self,
        models: list[Any],
        ctx: ParallelContext,
        train: TrainConfig,
        *,
        temperature: float,
        vocab_size: int | None,
        pad_token_id: int,
        optimizer: Any = None,
        scheduler: Any = None,
    ):
        self.models, self.ctx, self.cfg = models, ctx, train
        self.temperature, self.vocab_size, self.pad_token_id = temperature, vocab_size, pad_token_id
        self.optimizer, self.scheduler = optimizer, scheduler
        self.num_skipped_steps = 0
        self._device = ctx.device
        # MoE routing replay: active when the model was built with moe_enable_routing_replay
        self.replay = RoutingReplay(models, ctx)
        if ctx.vpp > 1:
            # Interleaved 1F1B with variable_seq_lengths crashes on gloo (shape exchange); packs are
            # padded to one length instead (pack(equal_length=True)) and shapes are fixed.
            for model in models:
                model.config.variable_seq_lengths = False

    # --- packing -------------------------------------------------------------------------------

    def pack(self, samples: list[TrainSample]) -> PackedBatch:
        c = self.ctx
        return pack_batch(
            samples,
            max_tokens_per_microbatch=self.cfg.max_tokens_per_microbatch,
            dp_size=c.dp,
            dp_rank=c.dp_rank,
            cp_size=c.cp,
            cp_rank=c.cp_rank,
            tp_size=c.tp,
            sequence_parallel=c.sequence_parallel,
            microbatch_multiple=c.pp if c.vpp > 1 else 1,
            pad_id=self.pad_token_id,
            equal_length=c.vpp > 1,
        )

    def dp_plan(self, num_tokens: list[int]) -> tuple[list[int], list[list[int]]]:
        """(padded lengths, sample ids per DP rank) of samples of `num_tokens`, as `pack` plans."""
        c = self.ctx
        multiple = pad_multiple(c.cp, c.tp, c.sequence_parallel)
        padded = [padded_length(n, multiple) for n in num_tokens]
        return padded, balance_across_dp(padded, c.dp)

    def _micro(self, mb: MicroBatch, packed: PackedBatch | None, train: bool) -> _Micro:
        d = self._device
        select = torch.nonzero(mb.loss_mask > 0, as_tuple=False).flatten()
        m = _Micro(mb=mb, select=select.to(d), labels=mb.labels[select].to(d))
        if train:
            assert packed is not None
            w = token_weights(
                mb.loss_mask,
                mb.seq_num_loss_tokens,
                mode=self.cfg.loss_agg_mode,
                global_num_loss_tokens=packed.global_num_loss_tokens,
                global_num_sequences=packed.global_num_sequences,
            )
            m.weights = w[select].to(d)
            m.old = mb.old_logprobs[select].to(d)
            m.adv = mb.advantages[select].to(d)
            if mb.ref_logprobs is not None:
                m.ref = mb.ref_logprobs[select].to(d)
        return m

    # --- model call ------------------------------------------------------------------------------

    def _output_processor(self, *, hidden_states, output_layer, output_weight, context, **_):
        """[s(/tp), 1, h] final hidden states -> [2, n_response] (log-probs, entropies)."""
        c = self.ctx
        h = hidden_states
        if c.sequence_parallel and c.tp > 1:
            h = gather_from_sequence_parallel_region(h, True, c.tp_group)
        elif c.tp > 1:
            h = copy_to_tensor_model_parallel_region(h, c.tp_group)
        h = h.squeeze(1).index_select(0, context.select)
        weight = output_weight if output_weight is not None else output_layer.weight
        lp, ent = chunked_logprobs(
            h,
            weight,
            context.labels,
            temperature=self.temperature,
            chunk_size=self.cfg.logprob_chunk_size,
            tp_group=c.tp_group if c.tp > 1 else None,
            vocab_start=c.tp_rank * weight.size(0),
            vocab_size=self.vocab_size,
        )
        return torch.stack([lp, ent])

    def _forward_step(self, micros, train, data_iterator, model):
        m: _Micro = micros[next(data_iterator)]
        d = self._device
        mb = m.mb
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=mb.cu_seqlens.to(d),
            cu_seqlens_kv=mb.cu_seqlens.to(d),
            cu_seqlens_q_padded=mb.cu_seqlens_padded.to(d),
            cu_seqlens_kv_padded=mb.cu_seqlens_padded.to(d),
            max_seqlen_q=mb.max_seqlen,
            max_seqlen_kv=mb.max_seqlen,
            cp_group=self.ctx.cp_group,
        )
        if self.replay.enabled:
            self.replay.before_forward(model, mb.routing)
        out = model(
            mb.tokens[None].to(d),
            mb.position_ids[None].to(d),
            None,
            packed_seq_params=params,
            output_processor=self._output_processor,
            output_processor_context=m,
        )
        if self.replay.enabled:
            self.replay.after_forward(model, mb.global_positions)
        loss_fn = self._train_loss if train else self._collect_logprobs
        return out, functools.partial(loss_fn, m)

    def _train_loss(self, m: _Micro, output: torch.Tensor):
        lp, ent = output[0], output[1]
        old = lp.detach() if m.on_policy else m.old
        loss, metrics = policy_loss(
            lp, old, m.adv, m.weights, self.cfg, entropy=ent, ref_logprobs=m.ref
        )
        if (
            m.on_policy and m.old is not None
        ):  # train/infer mismatch against the rollout's log-probs
            diff = (lp.detach() - m.old).abs()
            metrics["mismatch_sum"] = diff.sum()
            metrics["mismatch_count"] = torch.tensor(float(diff.numel()))
            metrics["mismatch_max"] = diff.max() if diff.numel() else diff.new_zeros(())
        n = torch.tensor(int(m.select.numel()), dtype=torch.int)
        return loss, n, {"loss": loss.detach(), **metrics}

    @staticmethod
    def _collect_logprobs(m: _Micro, output: torch.Tensor):
        zero = output.sum() * 0.0
        return (
            zero,
            torch.tensor(0, dtype=torch.int),
            {"logprobs": output[0].detach().float().cpu()},
        )

    def _run(self, micros: list[_Micro], *, forward_only: bool) -> list[dict]:
        fb = get_forward_backward_func()
        n = len(micros)
        iters = [iter(range(n)) for _ in self.models]
        try:
            return fb(
                forward_step_func=functools.partial(self._forward_step, micros, not forward_only),
                data_iterator=iters if len(self.models) > 1 else iters[0],
                model=self.models,
                num_microbatches=n,
                seq_length=max(m.mb.num_padded_tokens for m in micros),
                micro_batch_size=1,
                forward_only=forward_only,
            )
        finally:
            if self.replay.enabled:
                self.replay.clear()

    # --- public ------------------------------------------------------------------------------

    def train_step(
        self, samples: list[TrainSample], *, on_policy: bool = False
    ) -> dict[str, float]:
        """One optimizer step on the whole batch; returns globally reduced metrics (same on all ranks).

        `on_policy=True`: the batch was sampled from the current weights and this is its only optimizer
        step (SPELL: ppo_epochs=1, one mini-batch), so the PPO old log-probs equal the current ones. The
        loss then takes the current log-probs, detached, as the old ones (the same values a forward-only
        recompute gives, one forward pass fewer), and `old_logprobs` of the samples, where given, are the
        rollout engine's: they only feed `train/logprob_mismatch_mean` / `_max` (reported when every sample
        has them).
        """
        if self.optimizer is None:
            raise ValueError("PolicyEngine.train_step needs an optimizer (build_optimizer)")
        packed = self.pack(samples)
        micros = [self._micro(mb, packed, train=True) for mb in packed.micro_batches]
        with_rollout_lp = all(s.old_logprobs is not None for s in samples)
        for m in micros:
            m.on_policy = on_policy
            if on_policy and not with_rollout_lp:
                m.old = None
        for model in self.models:
            model.train()
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(micros, forward_only=False)
        metrics = self._reduce_metrics(outputs)
        mismatch = {k: metrics.pop(k) for k in (*_MISMATCH_KEYS, "mismatch_max")}
        if on_policy and mismatch["mismatch_count"]:
            metrics["logprob_mismatch_mean"] = mismatch["mismatch_sum"] / mismatch["mismatch_count"]
            metrics["logprob_mismatch_max"] = mismatch["mismatch_max"]
        finite = math.isfinite(metrics["loss"]) and self._grads_finite()
        grad_norm = float("nan")
        if finite:
            _ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if self.scheduler is not None:
                self.scheduler.step(increment=1)
        else:
            self.num_skipped_steps += 1
            self.optimizer.zero_grad()
            logger.warning(
                "non-finite loss or gradient: step skipped (%d so far)", self.num_skipped_steps
            )
        out = {f"train/{k}": v for k, v in metrics.items()}
        out.update(
            {
                "train/grad_norm": grad_norm,
                "train/num_tokens": float(packed.global_num_loss_tokens),
                "train/num_sequences": float(len(samples)),
                "train/num_microbatches": float(len(micros)),
                "train/num_skipped_steps": float(self.num_skipped_steps),
                "train/skipped": float(not finite),
                "train/lr": float(self.optimizer.param_groups[0]["lr"]),
            }
        )
        return out

    @torch.no_grad()
    def compute_logprobs(self, samples: list[TrainSample]) -> list[torch.Tensor]:
        """Forward-only per-response-token log-probs (fp32, CPU) of every sample, on every rank."""
        packed = self.pack(samples)
        micros = [self._micro(mb, None, train=False) for mb in packed.micro_batches]
        for model in self.models:
            model.eval()
        outputs = self._run(micros, forward_only=True)
        c = self.ctx
        mine: dict[int, torch.Tensor] = {}
        if c.is_last_pp_stage:
            local = [
                (m.mb.global_positions[m.select.cpu()], o["logprobs"])
                for m, o in zip(micros, outputs)
            ]
            parts = [None] * c.cp
            dist.all_gather_object(parts, local, group=c.cp_group)
            for k, m in enumerate(micros):
                full = torch.zeros(m.mb.num_padded_tokens)
                for rank_parts in parts:
                    pos, vals = rank_parts[k]
                    full[pos] = vals
                mine.update(response_values(m.mb, full))
        gathered = [None] * c.dp
        dist.all_gather_object(gathered, mine, group=c.dp_group)
        result: dict[int, torch.Tensor] = {}
        for g in gathered:
            result.update(g)
        if c.pp > 1:
            box = [result]
            dist.broadcast_object_list(
                box, src=dist.get_global_rank(c.pp_group, c.pp - 1), group=c.pp_group
            )
            result = box[0]
        return [result[i] for i in range(len(samples))]

    # --- helpers -------------------------------------------------------------------------------

    def _reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
        """Sums over micro-batches and ranks (`mismatch_max`: the maximum)."""
        c = self.ctx
        keys = (*METRIC_KEYS, *_MISMATCH_KEYS)
        vec = torch.zeros(len(keys), dtype=torch.float64)
        top = torch.zeros(1, dtype=torch.float64)
        for o in outputs:
            for i, k in enumerate(keys):
                if k in o:
                    vec[i] += float(o[k])
            if "mismatch_max" in o:
                top[0] = max(float(top[0]), float(o["mismatch_max"]))
        vec, top = vec.to(self._device), top.to(self._device)
        if c.pp > 1:
            dist.all_reduce(vec, group=c.pp_group)  # only the last stage holds values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=c.pp_group)
        dist.all_reduce(vec, group=c.dp_cp_group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=c.dp_cp_group)
        return {**dict(zip(keys, vec.tolist())), "mismatch_max": float(top.item())}

    def _grads_finite(self) -> bool:
        """True when every rank's reduced gradients are finite (a nan/inf anywhere makes its sum so)."""
        total = torch.zeros(1, dtype=torch.float32, device=self._device)
        for model in self.models:
            for buffers in (model.buffers, model.expert_parallel_buffers):
                for buf in buffers:
                    total += buf.grad_data.sum(dtype=torch.float32)
        flag = torch.tensor([0.0 if torch.isfinite(total).all() else 1.0], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() == 0.0)
