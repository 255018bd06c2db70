"""The loop's host collectives under a default group that refuses CPU tensors, as NCCL does.

The ranks re-create their default process group as `cuda:gloo`: gloo serves CUDA tensors only, so a
CPU tensor passed to the default group fails with "No backend type associated with device type cpu",
which is what NCCL (the default group of a GPU run) answers. `train.py`'s preemption flag
(`collectives.any_rank`) and round gather (`collectives.gather_rollout_results`, the loop's
`Collective.all_gather_object`) must pass on it, with every rollout TP group's leader's object, in rank
order, on every rank, and nothing of the other ranks'.
"""

from __future__ import annotations

import pytest

from tests.helpers.dist import find_free_port, run_distributed

pytestmark = pytest.mark.dist


def _host_collectives(rank: int, world: int, port: int, rollout_tp: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_spell import train
    from megatron_spell.collectives import any_rank, new_host_groups

    dist.destroy_process_group()
    dist.init_process_group(
        "cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        dist.all_reduce(torch.zeros(1))  # the control: this default group refuses CPU tensors
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    groups = new_host_groups(rollout_tp)
    collective = train._collective(groups)
    group = rank // rollout_tp
    # a round's shape: long token-id tuples (sent as an array) shared between records
    prompt = tuple(range(group * 1000, group * 1000 + 500))
    local = {"group": group, "sender": rank, "records": [prompt, prompt]}
    gathered = collective.all_gather_object(local)
    return {
        "refused": refused,
        "flag_any": any_rank(rank == world - 1, groups),
        "flag_none": any_rank(False, groups),
        "rollout": (collective.rollout_rank, collective.rollout_world),
        "gathered": gathered,
        "shared": all(g["records"][0] is g["records"][1] for g in gathered),
    }


@pytest.mark.parametrize("world,rollout_tp", [(2, 1), (4, 2)], ids=["dp2", "tp2x2"])
def test_flag_and_round_gather_never_use_the_default_group(world, rollout_tp):
    out = run_distributed(_host_collectives, world, find_free_port(), rollout_tp, timeout=120)
    leaders = list(range(0, world, rollout_tp))
    expected = [
        {
            "group": g,
            "sender": leader,  # the leader's object, not a TP peer's
            "records": [tuple(range(g * 1000, g * 1000 + 500))] * 2,
        }
        for g, leader in enumerate(leaders)
    ]
    for rank, r in enumerate(out):
        assert "device type cpu" in r["refused"], r["refused"]
        assert r["flag_any"] is True and r["flag_none"] is False
        assert r["rollout"] == (rank // rollout_tp, world // rollout_tp)
        assert r["gathered"] == expected
        assert r["shared"]
