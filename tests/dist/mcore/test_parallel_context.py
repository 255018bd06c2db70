"""Tests for megatron_spell/mcore/parallel.py: ParallelContext from init_parallel on gloo ranks."""

from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed


def _ctx_rank(rank: int, world_size: int, sizes: dict) -> dict:
    import torch.distributed as dist

    from megatron_spell.config import ParallelConfig
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(ParallelConfig(**sizes), seed=1)
    groups = {
        name: dist.get_process_group_ranks(getattr(ctx, f"{name}_group"))
        for name in ("tp", "pp", "cp", "dp", "dp_cp", "ep", "mp")
    }
    out = {
        "sizes": (ctx.tp, ctx.pp, ctx.cp, ctx.ep, ctx.etp, ctx.dp, ctx.vpp),
        "coords": (ctx.tp_rank, ctx.pp_rank, ctx.cp_rank, ctx.dp_rank, ctx.ep_rank),
        "groups": groups,
        "rank": (ctx.rank, ctx.world_size),
        "pg_tp": dist.get_process_group_ranks(ctx.pg_collection.tp),
    }
    destroy_parallel()
    # Re-initialising after destroy works (one context per process at a time).
    ctx2 = init_parallel(ParallelConfig(), seed=1)
    assert ctx2.tp == 1 and ctx2.dp == world_size
    destroy_parallel()
    assert dist.is_initialized()  # the harness owns the default group; destroy_parallel keeps it
    try:
        init_parallel(ParallelConfig(tensor_model_parallel_size=3))
    except ValueError as e:
        out["bad_layout_error"] = str(e)
    return out


@pytest.mark.slow
def test_init_parallel_tp2_pp2_groups() -> None:
    sizes = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    outs = run_distributed(_ctx_rank, 4, sizes, timeout=240)
    for rank, o in enumerate(outs):
        assert o["rank"] == (rank, 4)
        assert o["sizes"] == (2, 2, 1, 1, 2, 1, 1)
        # Megatron's default order tp-cp-ep-dp-pp: tp varies fastest, pp slowest.
        assert o["coords"] == (rank % 2, rank // 2, 0, 0, 0)
        assert o["groups"]["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert o["groups"]["pp"] == [rank % 2, rank % 2 + 2]
        assert o["groups"]["dp"] == [rank] and o["groups"]["cp"] == [rank]
        assert o["groups"]["mp"] == [0, 1, 2, 3]
        assert o["pg_tp"] == o["groups"]["tp"]


@pytest.mark.slow
def test_init_parallel_dp2_ep2() -> None:
    sizes = {"expert_model_parallel_size": 2}
    outs = run_distributed(_ctx_rank, 2, sizes, timeout=240)
    for rank, o in enumerate(outs):
        assert o["sizes"] == (1, 1, 1, 2, 1, 2, 1)
        assert o["coords"] == (0, 0, 0, rank, rank)
        assert o["groups"]["dp"] == [0, 1] and o["groups"]["dp_cp"] == [0, 1]
        assert o["groups"]["ep"] == [0, 1] and o["groups"]["tp"] == [rank]
        # A layout that does not divide the world size is a ValueError naming the sizes.
        assert "not divisible" in o["bad_layout_error"] and "3x1x1" in o["bad_layout_error"]
