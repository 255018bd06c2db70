"""The optimizer and model builder read the run's config sections as they are.

- Weight decay: Megatron's param groups give biases and 1-D parameters (norm weights) `wd_mult = 0`;
  matrices (and embeddings) get 1. A deliberate deviation from the reference, which decays every
  parameter (mcore/optimizer.py docstring).
- `train.*` reaches Megatron's OptimizerConfig and scheduler unchanged.
- `model.attention_backend` picks the layer spec.
"""

from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed

torch = pytest.importorskip("torch")


def _optimizer_rank(rank: int, world_size: int, hf_dir: str) -> dict:
    from megatron_spell.config import ParallelConfig, TrainConfig
    from megatron_spell.mcore.attention import PackedCPAttention
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(ParallelConfig())
    models = build_model(
        load_hf_config(hf_dir), ctx, core_attention=PackedCPAttention, use_te=False
    )
    ddp = wrap_ddp(models, ctx, use_distributed_optimizer=False)
    train = TrainConfig(
        lr=3e-4, weight_decay=0.05, adam_beta2=0.95, grad_clip=0.5, use_distributed_optimizer=False
    )
    opt = build_optimizer(ddp, train, ctx)
    sched = build_scheduler(opt, train)
    names = {id(p): n for chunk in ddp for n, p in chunk.named_parameters()}
    groups = {}
    for group in opt.param_groups:
        for p in group["params"]:
            groups[names[id(p)]] = (group["wd_mult"], p.dim())
    out = {
        "groups": groups,
        "lr": opt.param_groups[0]["lr"],
        "clip_grad": opt.config.clip_grad,
        "beta2": opt.config.adam_beta2,
        "wd": sched.start_wd,
    }
    destroy_parallel()
    return out


def test_weight_decay_skips_biases_and_norms(tmp_path):
    from tests.helpers.tiny_models import make_tiny_hf_model

    hf_dir = make_tiny_hf_model(tmp_path / "qwen2", "qwen2")  # q/k/v biases
    [out] = run_distributed(_optimizer_rank, 1, str(hf_dir), timeout=240)
    groups = out["groups"]
    assert groups, "no parameters in the optimizer"
    biases = [n for n in groups if n.endswith(".bias")]
    norms = [n for n in groups if "norm" in n.rsplit(".", 2)[-2] and groups[n][1] == 1]
    matrices = [n for n, (_, dim) in groups.items() if dim >= 2]
    assert biases and norms and matrices, sorted(groups)
    assert all(groups[n][0] == 0.0 for n in biases + norms), groups
    assert all(groups[n][0] == 1.0 for n in matrices), groups
    assert any("word_embeddings" in n for n in matrices)  # embeddings are decayed
    assert (out["lr"], out["clip_grad"], out["beta2"], out["wd"]) == (3e-4, 0.5, 0.95, 0.05)


def test_attention_backend_picks_the_spec():
    from megatron_spell.mcore.attention import PackedCPAttention, core_attention_class
    from megatron_spell.mcore.model import _have_transformer_engine, use_transformer_engine

    assert use_transformer_engine("local") is False
    assert use_transformer_engine("auto") is _have_transformer_engine()
    assert core_attention_class(False) is PackedCPAttention and core_attention_class(True) is None
    if not _have_transformer_engine():
        with pytest.raises(
            ValueError, match="model.attention_backend='te'.*attention_backend=auto"
        ):
            use_transformer_engine("te")
    else:
        assert use_transformer_engine("te") is True
