"""HF -> Megatron conversions for test fixtures, run in the pooled one-rank process of tests/helpers/dist.py.

A conversion's own cost is small next to importing torch and Megatron in a new process; the pooled rank has
them imported already. The command-line tools themselves are tested in tests/e2e/convert.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tests.helpers.dist import run_distributed


def convert_to_megatron(
    pairs: Iterable[tuple[str | Path, str | Path]], timeout: float = 900
) -> None:
    """Convert every (HF dir, checkpoint dir) pair with `convert_hf_to_megatron`, fp32."""
    run_distributed(_convert_rank, 1, [(str(a), str(b)) for a, b in pairs], timeout=timeout)


def _convert_rank(rank: int, world_size: int, pairs: list[tuple[str, str]]) -> None:
    from megatron_spell.mcore.checkpoint import convert_hf_to_megatron

    for hf_dir, out_dir in pairs:
        convert_hf_to_megatron(hf_dir, out_dir, progress=False)
