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
   count for seq_mean); gradients are summed over DP x CP by Megatron DDP (optimizer.wrap_ddp). With a
   rollout correction configured (`train.rollout_is` / `rollout_rs` / `rollout_token_veto_threshold`, on
   the on-policy step), `rollout_correction` turns the training pass's log-probs and the rollout's into
   the per-token factor of the policy-gradient term; its sequence sums are all-reduced over the CP group
   inside the loss function (every CP rank runs every micro-batch), and its metrics per role are summed
   (maxima: max) over micro-batches and ranks like the others. Its "sequence" is one response (a
   `response_spans` entry), so it composes with shared-prefix units. Off, none of this runs.
   With MoE routing replay (a model built with `moe_enable_routing_replay`), each micro-batch's
   routing rows (`MicroBatch.routing`) are set on its chunk's routers before its forward
   (mcore/replay.py);
4. non-finite loss or gradients on any rank skip the step everywhere (counted in `train/num_skipped_steps`);
   otherwise the optimizer clips and steps, and the LR scheduler advances.

`PolicyEngine.compute_logprobs(samples)` is the forward-only pass for old / reference log-probs: it returns
the per-response-token log-probs of every sample, on every rank, in input order.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_spell.config import TrainConfig
from megatron_spell.mcore.attention import SharedPrefixSeqParams, set_rope_positions
from megatron_spell.mcore.logprobs import chunked_logprobs
from megatron_spell.mcore.loss import policy_loss, token_weights
from megatron_spell.mcore.packing import (
    BatchPlan,
    MicroBatch,
    PackedBatch,
    TrainSample,
    pack_batch,
    plan_batch,
    response_values,
)
from megatron_spell.mcore.parallel import ParallelContext
from megatron_spell.mcore.replay import RoutingReplay
from megatron_spell.mcore.rollout_correction import (
    SUM_KEYS,
    CorrectionSpec,
    correction_metrics,
    correction_sums,
    rollout_correction,
)
from megatron_spell.mcore.routing_exchange import UnitRouting, local_routing

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
    # the loss's old log-probs are the current ones; `old` then holds the rollout's (mismatch metric and
    # rollout correction)
    on_policy: bool = False
    # rollout correction only: each response token's response in the pack, that response's length,
    # the pack's response count, each token's role index
    seq_index: torch.Tensor | None = None
    seq_len: torch.Tensor | None = None
    num_seqs: int = 0
    group: torch.Tensor | None = None


class PolicyEngine:
    """Train step and forward-only log-probs for DDP-wrapped Megatron model chunks.

    `train` is the run's `train` section (loss, micro-batching, log-prob chunks). The rest is not in
    it: `temperature` is the rollout's (log-probs are taken of softmax(logits / temperature)),
    `vocab_size` the true (HF) vocabulary (padded output rows are masked) and `pad_token_id` fills
    the packs. `shared_prefix` (default `train.shared_prefix`) packs samples with identical prompts
    with the prompt once (`packing` module docstring); it needs our core attention
    (`attention.PackedCPAttention`), so the caller passes False with Transformer Engine's.
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
        shared_prefix: bool | None = None,
    ):
        self.models, self.ctx, self.cfg = models, ctx, train
        self.shared_prefix = train.shared_prefix if shared_prefix is None else shared_prefix
        self.temperature, self.vocab_size, self.pad_token_id = temperature, vocab_size, pad_token_id
        self.optimizer, self.scheduler = optimizer, scheduler
        self.num_skipped_steps = 0
        self._device = ctx.device
        self.correction = CorrectionSpec.from_train(train)
        self._roles: list[str] = []  # role names of the current batch (rollout-correction metrics)
        # MoE routing replay: active when the model was built with moe_enable_routing_replay
        self.replay = RoutingReplay(models, ctx)
        # routing replay: UnitRouting.num_prompt_differ of the last pack
        self.routing_prompt_differ = 0
        if ctx.vpp > 1:
            # Interleaved 1F1B with variable_seq_lengths crashes on gloo (shape exchange); packs are
            # padded to one length instead (pack(equal_length=True)) and shapes are fixed.
            for model in models:
                model.config.variable_seq_lengths = False

    # --- packing -------------------------------------------------------------------------------

    def plan(self, samples: Sequence[TrainSample]) -> BatchPlan:
        """The batch's units and DP balance, as `pack` plans them (the routing exchange's plan)."""
        c = self.ctx
        return plan_batch(
            samples,
            max_tokens_per_microbatch=self.cfg.max_tokens_per_microbatch,
            dp_size=c.dp,
            cp_size=c.cp,
            tp_size=c.tp,
            sequence_parallel=c.sequence_parallel,
            shared_prefix=self.shared_prefix,
        )

    def _unit_routing(
        self, samples: Sequence[TrainSample], plan: BatchPlan, routing: UnitRouting | None
    ) -> UnitRouting | None:
        """`routing` as given (exchanged), else laid out from the samples' whole routing."""
        if routing is not None and not self.replay.enabled:
            raise ValueError(
                "routing given for a model built without routing replay: build it with "
                "config_overrides={'moe_enable_routing_replay': True} (train.routing_replay)"
            )
        if routing is None and self.replay.enabled and any(s.routing is not None for s in samples):
            c = self.ctx
            routing = local_routing(samples, plan, c.cp, c.cp_rank, c.dp_rank)
        return routing

    def pack(self, samples: list[TrainSample], routing: UnitRouting | None = None) -> PackedBatch:
        """This rank's micro-batches; `routing` (routing replay) as `exchange_routing` gives it, or
        None to take the samples' own `routing`."""
        c = self.ctx
        plan = self.plan(samples)
        routing = self._unit_routing(samples, plan, routing)
        self.routing_prompt_differ = 0 if routing is None else routing.num_prompt_differ
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
            shared_prefix=self.shared_prefix,
            plan=plan,
            routing=None if routing is None else routing.rows,
        )

    def _micro(
        self, mb: MicroBatch, packed: PackedBatch | None, train: bool, role_ids: Sequence[int] = ()
    ) -> _Micro:
        d = self._device
        select = torch.nonzero(mb.loss_mask > 0, as_tuple=False).flatten()
        m = _Micro(mb=mb, select=select.to(d), labels=mb.labels[select].to(d))
        if train and role_ids:
            # a token's "sequence" is its response (a shared-prefix unit holds several): the k-th
            # response span of the unsplit pack, numbered alike on every CP rank
            owner = torch.zeros(mb.num_padded_tokens, dtype=torch.long)
            for k, (start, end) in enumerate(mb.response_spans):
                owner[start:end] = k
            seq = owner[mb.global_positions[select]]
            m.seq_index, m.seq_len = seq.to(d), mb.seq_num_loss_tokens[select].to(d)
            m.num_seqs = max(len(mb.response_spans), 1)
            roles = torch.tensor([role_ids[i] for i in mb.sample_ids] or [0], dtype=torch.long)
            m.group = roles[seq].to(d)
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
        params = SharedPrefixSeqParams(
            qkv_format="thd",
            cu_seqlens_q=mb.cu_seqlens.to(d),
            cu_seqlens_kv=mb.cu_seqlens.to(d),
            cu_seqlens_q_padded=mb.cu_seqlens_padded.to(d),
            cu_seqlens_kv_padded=mb.cu_seqlens_padded.to(d),
            max_seqlen_q=mb.max_seqlen,
            max_seqlen_kv=mb.max_seqlen,
            # None: the attention and RoPE take the static CP group from pg_collection; a group
            # here makes TE re-register its CP communicator at every attention call
            cp_group=None,
            unit_segments=mb.unit_segments,
        )
        if self.shared_prefix:
            set_rope_positions(model, mb.rope_positions)
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
        factor = None
        corr_metrics: dict[str, torch.Tensor] = {}
        if self.correction is not None:
            factor, corr_metrics = self._correction(m, lp)
        loss, metrics = policy_loss(
            lp,
            old,
            m.adv,
            m.weights,
            self.cfg,
            entropy=ent,
            ref_logprobs=m.ref,
            rollout_weights=factor,
        )
        metrics.update(corr_metrics)
        if (
            m.on_policy and m.old is not None
        ):  # train/infer mismatch against the rollout's log-probs
            diff = (lp.detach() - m.old).abs()
            metrics["mismatch_sum"] = diff.sum()
            metrics["mismatch_count"] = torch.tensor(float(diff.numel()))
            metrics["mismatch_max"] = diff.max() if diff.numel() else diff.new_zeros(())
            if m.group is not None:  # per role: [roles] sums, counts and maxima
                r = len(self._roles)
                g = m.group
                d64 = diff.double()
                metrics["mismatch_role"] = torch.stack(
                    [
                        torch.zeros(r, dtype=torch.float64, device=g.device).index_add_(0, g, d64),
                        torch.bincount(g, minlength=r).double(),
                    ]
                ).cpu()
                top = torch.zeros(r, dtype=torch.float64, device=g.device)
                metrics["mismatch_role_max"] = top.scatter_reduce(0, g, d64, "amax").cpu()
        n = torch.tensor(int(m.select.numel()), dtype=torch.int)
        return loss, n, {"loss": loss.detach(), **metrics}

    def _correction(self, m: _Micro, lp: torch.Tensor):
        """Rollout-correction factor of the micro-batch's tokens and its metric sums."""
        c = self.ctx
        corr = rollout_correction(
            lp.detach() - m.old,
            self.correction,
            seq_index=m.seq_index,
            seq_len=m.seq_len,
            num_seqs=m.num_seqs,
            all_reduce_sum=self._cp_sum if c.cp > 1 else None,
        )
        sums, top = correction_sums(corr, m.group, len(self._roles))
        return corr.factor, {"corr_sums": sums.cpu(), "corr_max": top.cpu()}

    def _cp_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.ctx.cp_group)
        return t

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
        self,
        samples: list[TrainSample],
        *,
        on_policy: bool = False,
        routing: UnitRouting | None = None,
    ) -> dict[str, float]:
        """One optimizer step on the whole batch; returns globally reduced metrics (same on all ranks).

        `on_policy=True`: the batch was sampled from the current weights and this is its only optimizer
        step (SPELL: ppo_epochs=1, one mini-batch), so the PPO old log-probs equal the current ones. The
        loss then takes the current log-probs, detached, as the old ones (the same values a forward-only
        recompute gives, one forward pass fewer), and `old_logprobs` of the samples, where given, are the
        rollout engine's: they only feed `train/logprob_mismatch_mean` / `_max` (reported when every sample
        has them). `routing`: see `pack` (routing replay).
        """
        if self.optimizer is None:
            raise ValueError("PolicyEngine.train_step needs an optimizer (build_optimizer)")
        packed = self.pack(samples, routing)
        with_rollout_lp = all(s.old_logprobs is not None for s in samples)
        role_ids: list[int] = []
        if self.correction is not None and not (on_policy and with_rollout_lp):
            missing = sum(s.old_logprobs is None for s in samples)
            raise ValueError(
                "the rollout correction (train.rollout_is / rollout_rs / "
                "rollout_token_veto_threshold) needs the on-policy step with the rollout's "
                f"log-probs of every sample as old_logprobs (on_policy={on_policy}, {missing} of "
                f"{len(samples)} samples without them); turn the correction off otherwise"
            )
        if on_policy and with_rollout_lp:  # per-role mismatch and correction metrics
            self._roles = sorted({s.role for s in samples})
            role_ids = [self._roles.index(s.role) for s in samples]
        micros = [self._micro(mb, packed, True, role_ids) for mb in packed.micro_batches]
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
        if self.correction is not None:
            metrics.update(self._reduce_correction(outputs))
        mismatch = {k: metrics.pop(k) for k in (*_MISMATCH_KEYS, "mismatch_max")}
        if on_policy and mismatch["mismatch_count"]:
            metrics["logprob_mismatch_mean"] = mismatch["mismatch_sum"] / mismatch["mismatch_count"]
            metrics["logprob_mismatch_max"] = mismatch["mismatch_max"]
            metrics.update(self._reduce_role_mismatch(outputs))
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
                # padded tokens through the model (all DP ranks), and the shared-prefix packing
                "train/num_model_tokens": float(packed.global_num_tokens),
                # the trajectories' tokens as separate sequences, unpadded (what unshared costs)
                "train/num_trajectory_tokens": float(sum(s.num_tokens for s in samples)),
                "train/shared_prefix_units": float(packed.num_shared_units),
                "train/shared_prefix_split_units": float(packed.num_split_units),
                "train/shared_prefix_fallback": float(packed.num_unshared_fallback),
                "train/num_skipped_steps": float(self.num_skipped_steps),
                "train/skipped": float(not finite),
                "train/lr": float(self.optimizer.param_groups[0]["lr"]),
            }
        )
        if self.replay.enabled:  # shared-unit samples replayed with their source's prompt rows
            out["train/routing_prompt_differ"] = float(self.routing_prompt_differ)
        return out

    @torch.no_grad()
    def compute_logprobs(
        self, samples: list[TrainSample], routing: UnitRouting | None = None
    ) -> list[torch.Tensor]:
        """Forward-only per-response-token log-probs (fp32, CPU) of every sample, on every rank."""
        packed = self.pack(samples, routing)
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

    def _per_role(self, outputs: list[dict], key: str, top_key: str, shape) -> tuple:
        """The micro-batches' per-role sums (`key`, of `shape`) and maxima (`top_key`, [roles]),
        reduced over the ranks; with PP only the last stage holds values."""
        c = self.ctx
        sums = torch.zeros(shape, dtype=torch.float64)
        top = torch.zeros(len(self._roles), dtype=torch.float64)
        for o in outputs:
            if key in o:
                sums += o[key]
                top = torch.maximum(top, o[top_key])
        sums, top = sums.to(self._device), top.to(self._device)
        for group in [c.dp_cp_group] if c.pp == 1 else [c.pp_group, c.dp_cp_group]:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        return sums.cpu(), top.cpu()

    def _reduce_role_mismatch(self, outputs: list[dict]) -> dict[str, float]:
        """`logprob_mismatch_mean/<role>` and `_max/<role>` over the whole batch: a role whose
        rollout is constrained (rollout.structured_outputs) reports vLLM's masked distribution, so
        its gap is not the train/rollout numerics gap the others show (docs/learning-run.md)."""
        n = len(self._roles)
        sums, top = self._per_role(outputs, "mismatch_role", "mismatch_role_max", (2, n))
        out = {}
        for i, role in enumerate(self._roles):
            if sums[1, i] > 0:
                out[f"logprob_mismatch_mean/{role}"] = float(sums[0, i] / sums[1, i])
                out[f"logprob_mismatch_max/{role}"] = float(top[i])
        return out

    def _reduce_correction(self, outputs: list[dict]) -> dict[str, float]:
        """Rollout-correction metrics of the whole batch, per role (sums; maxima by max)."""
        shape = (len(self._roles), len(SUM_KEYS))
        sums, top = self._per_role(outputs, "corr_sums", "corr_max", shape)
        return correction_metrics(sums, top, self._roles)

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
