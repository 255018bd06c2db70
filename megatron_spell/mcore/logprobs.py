"""Chunked, vocab-parallel token log-probabilities and entropy at the rollout temperature
(docs/spell-algorithm.md §5).

The policy's log-probs (old, new, reference) are computed on logits divided by the rollout temperature
(`SPELL/verl/verl/workers/actor/dp_actor.py:161,236`). Full-vocabulary fp32 logits over a long
packed sequence do not fit in memory (100K tokens x Qwen3's 151,936 vocab = 56.6 GiB;
THUDM/slime#2253), so:

- only the positions that predict response tokens are projected at all (the caller selects them);
- the projection, softmax statistics and their backward run in chunks of `chunk_size` tokens inside one
  custom autograd Function, which saves only the input hidden states and two floats per token, and recomputes
  each chunk's logits in the backward: at no point does more than one [chunk, vocab/tp] fp32 block exist;
- with tensor parallelism the output weight is vocab-sharded; the max, the sum of exponentials, the target
  logit and the expected logit are all-reduced over the TP group (Megatron's vocab-parallel cross entropy).

Gradients: for z = logits / T, p = softmax(z):
  d logp(y) / dz = onehot(y) - p;   d H / dz = -p * (z - sum(p z)).
The hidden-state gradient of each TP rank is partial (its vocab shard); the caller's
`copy_to_tensor_model_parallel_region` / sequence-parallel gather sums it in the backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(
    t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None
) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_stats(z: torch.Tensor, labels: torch.Tensor, vocab_start: int, group) -> tuple:
    """(logsumexp, target logit, expected logit) of one chunk of scaled logits z [c, V_local]."""
    m = z.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, group)
    e = (z - m[:, None]).exp()
    sum_e = e.sum(dim=-1)
    local = labels - vocab_start
    in_range = (local >= 0) & (local < z.size(-1))
    target = z.gather(-1, local.clamp(0, z.size(-1) - 1)[:, None]).squeeze(-1) * in_range
    ez = (e * z).sum(dim=-1)
    packed = torch.stack([sum_e, target, ez])
    _all_reduce(packed, dist.ReduceOp.SUM, group)
    sum_e, target, ez = packed
    lse = m + sum_e.log()
    return lse, target, ez / sum_e


_MASKED = -1e30  # logit of padded vocabulary rows (finite: keeps p * z at 0 instead of nan)


def _scaled_logits(hidden, weight, inv_temp, valid_cols):
    z = (hidden @ weight.t()).float() * inv_temp
    if valid_cols < z.size(-1):
        z[:, max(valid_cols, 0) :] = _MASKED
    return z


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temp, chunk_size, group, vocab_start, valid_cols):
        n = hidden.size(0)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        lse_all = torch.empty_like(logprobs)
        mean_z_all = torch.empty_like(logprobs)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _scaled_logits(hidden[s:e], weight, inv_temp, valid_cols)
            lse, target, mean_z = _chunk_stats(z, labels[s:e], vocab_start, group)
            del z
            logprobs[s:e] = target - lse
            entropy[s:e] = lse - mean_z
            lse_all[s:e] = lse
            mean_z_all[s:e] = mean_z
        ctx.save_for_backward(hidden, weight, labels, lse_all, mean_z_all)
        ctx.set_materialize_grads(
            False
        )  # an unused output (often entropy) costs nothing in backward
        ctx.inv_temp, ctx.chunk_size, ctx.vocab_start = inv_temp, chunk_size, vocab_start
        ctx.valid_cols = valid_cols
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, lse_all, mean_z_all = ctx.saved_tensors
        inv_temp, chunk_size, vocab_start = ctx.inv_temp, ctx.chunk_size, ctx.vocab_start
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        v_local = weight.size(0)
        for s in range(0, hidden.size(0), chunk_size):
            e = min(s + chunk_size, hidden.size(0))
            z = _scaled_logits(hidden[s:e], weight, inv_temp, ctx.valid_cols)
            p = (z - lse_all[s:e, None]).exp()
            if grad_logprobs is not None:
                g_lp = grad_logprobs[s:e].float()
            else:
                g_lp = torch.zeros(e - s, dtype=torch.float32, device=p.device)
            dz = -p * g_lp[:, None]
            if grad_entropy is not None:
                dz -= p * (z - mean_z_all[s:e, None]) * grad_entropy[s:e, None].float()
            local = labels[s:e] - vocab_start
            in_range = (local >= 0) & (local < v_local)
            rows = torch.nonzero(in_range, as_tuple=False).flatten()
            dz[rows, local[rows]] += g_lp[rows]
            dz = (dz * inv_temp).to(hidden.dtype)
            del z, p
            if grad_hidden is not None:
                grad_hidden[s:e] = dz @ weight
            grad_weight += (dz.t() @ hidden[s:e]).float()
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `labels` and entropy under softmax(hidden @ weight.T / temperature), chunked.

    hidden: [n, h] (already reduced/gathered for TP: identical on all TP ranks); weight: [V_local, h], the
    vocab rows [vocab_start, vocab_start + V_local) of the output layer on this TP rank; labels: [n] global
    vocab ids. `vocab_size` is the true vocabulary: rows of a padded output layer at or beyond it are
    excluded from the softmax (Megatron pads the vocab for TP; HF and vLLM do not). Returns fp32 (logprobs [n], entropy [n]). Differentiable in hidden and weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"train.logprob_chunk_size must be > 0, got {chunk_size}")
    valid_cols = weight.size(0) if vocab_size is None else int(vocab_size) - int(vocab_start)
    return _ChunkedLogprob.apply(
        hidden,
        weight,
        labels,
        1.0 / temperature,
        int(chunk_size),
        tp_group,
        int(vocab_start),
        min(valid_cols, weight.size(0)),
    )


def reference_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchunked single-device reference (for tests): log-softmax of logits / T at labels, and entropy."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
