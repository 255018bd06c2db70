"""Atomic checkpoint directories, rotation, RL state round trip, RNG capture."""

import random

import numpy as np
import pytest
import torch

from megatron_spell.checkpointing import CheckpointManager, RLState, capture_rng, restore_rng


def _write(payload: str):
    def write(tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.txt").write_text(payload)

    return write


def test_save_rotate_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        mgr.save(step, _write(f"w{step}"), RLState(step=step, history={"k": [step]}))
    done = mgr.complete()
    assert [p.name for p in done] == ["step_00000002", "step_00000003"]
    latest = mgr.latest()
    assert (latest / "model" / "weights.txt").read_text() == "w3"
    state = CheckpointManager.load_state(latest)
    assert state.step == 3 and state.history == {"k": [3]}


def test_kill_during_save_keeps_previous(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _write("w1"), RLState(step=1))

    def dies(tmp):
        (tmp / "model").mkdir()
        raise KeyboardInterrupt  # the process is killed half way through writing

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, dies, RLState(step=2))
    assert mgr.latest().name == "step_00000001"
    assert (
        tmp_path / "step_00000002.tmp"
    ).exists()  # debris is ignored, and replaced by the next save
    mgr.save(2, _write("w2"), RLState(step=2))
    assert mgr.latest().name == "step_00000002"
    assert not (tmp_path / "step_00000002.tmp").exists()


def test_missing_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete SPELL checkpoint"):
        CheckpointManager.load_state(tmp_path)


def test_rng_roundtrip():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
