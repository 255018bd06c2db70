"""Tests for the gloo multi-process harness (tests/helpers/dist.py) and the tiny HF model factory."""

from __future__ import annotations

import time

import pytest

from tests.helpers.dist import run_distributed


def _allreduce_rank(rank: int, world_size: int, scale: int) -> list[float]:
    import os

    import torch
    import torch.distributed as dist

    assert dist.get_backend() == "gloo"
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert torch.get_num_threads() == 1
    t = torch.tensor([float(rank * scale)])
    dist.all_reduce(t)
    gathered = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    return [t.item()] + [g.item() for g in gathered]


def _rank1_raises(rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("boom from rank one: marker 7f3a")
    # The healthy ranks block in a collective that rank 1 never joins: the harness must not hang.
    dist.all_reduce(torch.ones(1))


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_run_distributed_collectives(world_size: int) -> None:
    out = run_distributed(_allreduce_rank, world_size, 3, timeout=120)
    expected_sum = float(3 * sum(range(world_size)))
    assert out == [[expected_sum] + [float(r) for r in range(world_size)]] * world_size


def test_run_distributed_reports_failing_rank_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_rank1_raises, 2, timeout=120)
    msg = str(info.value)
    assert "rank 1 failed" in msg
    assert "boom from rank one: marker 7f3a" in msg
    assert "Traceback (most recent call last)" in msg
    assert "_rank1_raises" in msg  # the frame of the user's function is in the traceback
    # The blocked peer is terminated after a grace period, not after the 120 s timeout.
    assert time.monotonic() - start < 60
