"""Multi-rank smoke tests for build_model: TP=2 (+SP), PP=2 (1F1B schedule), EP=2 against a TP=1 reference.

Every rank first builds the single-process (TP=PP=EP=1) model of the same HF config, then the parallel model,
copies the reference weights into it (slicing TP shards, remapping pipeline layer numbers and expert indices),
runs forward + backward and compares logits, loss and gradients with the reference. This checks that
build_model wires the layout (groups, pre/post_process, tied embeddings, layer specs) correctly; exact
equality with transformers' logits is the converter's test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import make_tiny_hf_model

SEQ, BATCH, VOCAB = 12, 2, 512
ATOL = 1e-5


def _build(hf: Any, **sizes: Any) -> tuple[Any, list[Any]]:
    from megatron_spell.config import ParallelConfig
    from megatron_spell.mcore.model import build_model
    from megatron_spell.mcore.parallel import init_parallel

    ctx = init_parallel(ParallelConfig(**sizes), seed=0)
    return ctx, build_model(hf, ctx)


def _global_name(model: Any, name: str, ctx: Any) -> str:
    """Map a parallel model's parameter name to the reference model's (layers and experts)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
    e = re.search(r"local_experts\.(\d+)\.", name)
    if e:
        n_local = layer.mlp.num_local_experts
        g = ctx.ep_rank * n_local + int(e.group(1))
        name = name.replace(f"local_experts.{e.group(1)}.", f"local_experts.{g}.")
    return name


def _shard(full: Any, p: Any, name: str, tp: int, tp_rank: int) -> Any:
    import torch

    if not getattr(p, "tensor_model_parallel", False) or tp == 1 or ".experts." in name:
        return full
    dim = p.partition_dim
    if "linear_fc1" in name:  # SwiGLU: [gate; up], each half split over TP
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def _copy_weights(ref: Any, model: Any, ctx: Any) -> dict[str, str]:
    import torch

    ref_params = dict(ref.named_parameters())
    names = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = _global_name(model, name, ctx)
            if g not in ref_params and g == "output_layer.weight":  # tied, last PP stage
                g = "embedding.word_embeddings.weight"
            p.copy_(_shard(ref_params[g], p, name, ctx.tp, ctx.tp_rank))
            names[name] = g
    return names


def _inputs(seed: int) -> tuple[Any, Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    weight = torch.randn(BATCH, SEQ, VOCAB, generator=gen)  # loss = sum(logits * weight)
    return ids, pos, weight


def _reference(hf: Any, seeds: list[int]) -> tuple[Any, list[Any], float]:
    """TP=PP=EP=1 model; logits per input seed; grads of the summed loss over all seeds."""
    _, [ref] = _build(hf)
    logits = []
    total = 0.0
    for s in seeds:
        ids, pos, w = _inputs(s)
        out = ref(ids, pos, None)
        loss = (out * w).sum()
        loss.backward()
        logits.append(out.detach())
        total += loss.item()
    return ref, logits, total


def _check_grads(ref: Any, model: Any, ctx: Any, names: dict[str, str], skip: tuple) -> int:
    import torch

    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if any(s in name for s in skip):
            continue
        g_ref = _shard(ref_params[names[name]].grad, p, name, ctx.tp, ctx.tp_rank)
        assert p.grad is not None, name
        # Grads reach ~100 here: compare relative to the tensor's scale (fp32 summation order differs).
        scale = float(g_ref.abs().max()) + 1.0
        torch.testing.assert_close(p.grad, g_ref, atol=2e-6 * scale, rtol=0, msg=name)
        checked += 1
    return checked


def _tp2_rank(rank: int, world_size: int, hf_dir: str) -> int:
    import torch

    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel

    hf = load_hf_config(hf_dir)
    ref, [ref_logits], _ = _reference(hf, [0])
    destroy_parallel()
    ctx, [model] = _build(hf, tensor_model_parallel_size=2, sequence_parallel=True)
    assert model.config.sequence_parallel
    names = _copy_weights(ref, model, ctx)
    ids, pos, w = _inputs(0)
    out = model(ids, pos, None)  # vocab-parallel logits: this rank's half of the vocabulary
    shard = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    torch.testing.assert_close(out, ref_logits[..., shard], atol=ATOL, rtol=1e-4)
    (out * w[..., shard]).sum().backward()
    # Replicated norms get partial grads per TP rank under SP (and q/k norms with TP); Megatron's
    # finalize_model_grads sums them over TP for params marked sequence_parallel / q_layernorm, k_layernorm.
    for name, p in model.named_parameters():
        if "norm" in name:
            assert getattr(p, "sequence_parallel", False), name  # set by the CPU SP-norm patch
            torch.distributed.all_reduce(p.grad, group=ctx.tp_group)
    n = _check_grads(ref, model, ctx, names, skip=())
    destroy_parallel()
    return n


def _pp2_rank(rank: int, world_size: int, hf_dir: str) -> dict:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel

    hf = load_hf_config(hf_dir)
    ref, _, ref_loss = _reference(hf, [0])
    destroy_parallel()
    ctx, [model] = _build(hf, pipeline_model_parallel_size=2)
    assert model.pre_process is (rank == 0) and model.post_process is (rank == 1)
    names = _copy_weights(ref, model, ctx)
    ids, pos, w = _inputs(0)

    def forward_step(data_iterator: Any, chunk: Any) -> tuple[Any, Any]:
        out = chunk(ids, pos, None)
        return out, lambda o: ((o * w).sum(), {"loss": (o * w).sum().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
    )
    result = {"layers": sorted({int(n.split(".")[2]) for n in names.values() if ".layers." in n})}
    if ctx.is_last_pp_stage:
        result["loss"] = losses[0]["loss"].item()
        assert abs(result["loss"] - ref_loss) <= 1e-4 * abs(ref_loss) + 1e-4
    # Tied embedding: each stage holds a copy with its partial grad (lookup on the first stage, output
    # projection on the last); their sum over Megatron's embedding group (what finalize_model_grads
    # all-reduces in training) is the reference grad.
    from megatron.core import parallel_state as ps

    tied = model.shared_embedding_or_output_weight()
    [tied_name] = [n for n, p in model.named_parameters() if p is tied]
    assert tied_name == ("embedding.word_embeddings.weight" if rank == 0 else "output_layer.weight")
    assert names[tied_name] == "embedding.word_embeddings.weight"
    assert torch.distributed.get_world_size(ps.get_embedding_group()) == 2
    torch.distributed.all_reduce(tied.grad, group=ps.get_embedding_group())
    result["checked"] = _check_grads(ref, model, ctx, names, skip=())
    destroy_parallel()
    torch.distributed.barrier()
    return result


def _ep2_rank(rank: int, world_size: int, hf_dir: str) -> int:
    import torch

    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel

    hf = load_hf_config(hf_dir)
    # Each DP rank has its own input; experts see the tokens of both ranks, so the reference expert
    # grads come from the sum of both ranks' losses, and the non-expert grads from this rank's only.
    ref, ref_logits, _ = _reference(hf, [0, 1])
    destroy_parallel()
    ctx, [model] = _build(hf, expert_model_parallel_size=2)
    assert ctx.ep == 2 and ctx.dp == 2
    names = _copy_weights(ref, model, ctx)
    ids, pos, w = _inputs(rank)
    out = model(ids, pos, None)
    torch.testing.assert_close(out, ref_logits[rank], atol=ATOL, rtol=1e-4)
    (out * w).sum().backward()
    n = _check_grads(ref, model, ctx, names, skip=tuple(n for n in names if ".experts." not in n))
    assert n == 2 * 2 * 1  # 2 local experts x (fc1, fc2) x 1 MoE layer
    destroy_parallel()
    return n


@pytest.mark.slow
def test_tp2_sequence_parallel_matches_tp1(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path / "qwen3", "qwen3", tied=False)
    checked = run_distributed(_tp2_rank, 2, str(d), timeout=300)
    assert checked[0] == checked[1] > 10


@pytest.mark.slow
def test_pp2_tied_embeddings_matches_pp1(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path / "llama", "llama", tied=True, num_hidden_layers=4)
    out = run_distributed(_pp2_rank, 2, str(d), timeout=300)
    assert out[0]["layers"] == [0, 1] and out[1]["layers"] == [2, 3]
    assert "loss" in out[1] and all(o["checked"] > 5 for o in out)


@pytest.mark.slow
def test_ep2_moe_with_dense_layer_matches_ep1(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path / "moe", "qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0])
    assert run_distributed(_ep2_rank, 2, str(d), timeout=300) == [4, 4]


def _single_rank_smoke(rank: int, world_size: int, dirs: dict[str, str]) -> dict[str, Any]:
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_spell.config import ParallelConfig
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel

    calls = []

    class CountingAttention(DotProductAttention):  # the training engine's hook, minimal
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(self.layer_number)
            return super().forward(*args, **kwargs)

    ctx = init_parallel(ParallelConfig(), seed=0)
    out: dict[str, Any] = {}
    for family, d in dirs.items():
        hf = load_hf_config(d)
        [model] = build_model(hf, ctx, core_attention=CountingAttention)
        ids, pos, w = _inputs(0)
        logits = model(ids, pos, None)
        assert logits.shape == (BATCH, SEQ, VOCAB) and torch.isfinite(logits).all()
        (logits * w).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        tied = model.share_embeddings_and_output_weights
        out[family] = {"missing": missing, "tied": tied, "n_params": len(list(model.parameters()))}
    out["attention_calls"] = len(calls)
    destroy_parallel()
    return out


def _vpp_rank(rank: int, world_size: int, hf_dir: str) -> list[tuple]:
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel

    hf = load_hf_config(hf_dir)
    ctx, chunks = _build(hf, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert ctx.vpp == 2 and len(chunks) == 2
    info = [
        (c.pre_process, c.post_process, [layer.layer_number for layer in c.decoder.layers])
        for c in chunks
    ]
    assert all(not c.config.batch_p2p_comm for c in chunks)  # gloo + VPP trap (docs/platform.md)
    destroy_parallel()
    return info


@pytest.mark.slow
def test_build_model_all_families_single_rank(tmp_path: Path) -> None:
    dirs = {
        "llama": make_tiny_hf_model(tmp_path / "l", "llama", tied=True),
        "qwen2": make_tiny_hf_model(tmp_path / "q2", "qwen2"),
        "qwen3": make_tiny_hf_model(tmp_path / "q3", "qwen3", tied=True),
        "qwen3_moe": make_tiny_hf_model(tmp_path / "m", "qwen3_moe"),
    }
    [out] = run_distributed(_single_rank_smoke, 1, {k: str(v) for k, v in dirs.items()})
    assert out["attention_calls"] == 4 * 2  # the core_attention hook replaced every layer's
    for family in dirs:
        o = out[family]
        assert o["tied"] is (family in ("llama", "qwen3"))
        # Only MoE experts that received no token in this batch may lack a gradient.
        assert all(".experts." in n for n in o["missing"]), (family, o["missing"])


@pytest.mark.slow
def test_build_model_virtual_pipeline_chunks(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path / "l", "llama", num_hidden_layers=4)
    out = run_distributed(_vpp_rank, 2, str(d), timeout=300)
    # Interleaved order: rank 0 holds layers 1 and 3, rank 1 holds 2 and 4 (1-based).
    assert out[0] == [(True, False, [1]), (False, False, [3])]
    assert out[1] == [(False, False, [2]), (False, True, [4])]
