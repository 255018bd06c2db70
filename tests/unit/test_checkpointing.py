"""Atomic checkpoint directories, rotation, RL state round trip, RNG capture."""

import random

import numpy as np
import pytest
import torch

from megatron_spell.checkpointing import (
    CheckpointManager,
    RLState,
    capture_rng,
    find_checkpoint,
    restore_rng,
)


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


def _run_dir(tmp_path, steps=(1, 2), interrupted=(3,)):
    """A run directory as `train` leaves it: config.yaml, complete steps, an interrupted save."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run / "checkpoints", keep_last=5)
    for step in steps:
        mgr.save(step, _write(f"w{step}"), RLState(step=step))
    for step in interrupted:
        (mgr.step_dir(step).with_name(f"step_{step:08d}.tmp") / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {hf_dir: hf}\n")
    return run, mgr


def test_find_checkpoint_latest_step_and_step_dir(tmp_path):
    run, mgr = _run_dir(tmp_path)
    assert find_checkpoint(run) == (run, mgr.step_dir(2))
    assert find_checkpoint(run, 1) == (run, mgr.step_dir(1))
    assert find_checkpoint(mgr.step_dir(1)) == (run, mgr.step_dir(1))
    assert find_checkpoint(mgr.step_dir(1), 1) == (run, mgr.step_dir(1))
    with pytest.raises(ValueError, match="--step 2 contradicts"):
        find_checkpoint(mgr.step_dir(1), 2)


def test_find_checkpoint_errors_name_the_path_and_the_steps(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .*nope.* does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a run directory: no config.yaml"):
        find_checkpoint(tmp_path)
    run, mgr = _run_dir(tmp_path)
    steps = r"available steps: 1, 2 \(incomplete, not loadable: step_00000003.tmp\)"
    with pytest.raises(
        FileNotFoundError, match=f"no checkpoint of step 7 .*step_00000007.*{steps}"
    ):
        find_checkpoint(run, 7)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint of step 3 .*; {steps}"):
        find_checkpoint(run, 3)  # only its .tmp exists: the save was killed
    (mgr.step_dir(2) / "COMPLETE").unlink()
    with pytest.raises(
        FileNotFoundError, match="step_00000002.* is incomplete .*available steps: 1"
    ):
        find_checkpoint(run, 2)
    assert find_checkpoint(run) == (run, mgr.step_dir(1))
    empty, _ = _run_dir(tmp_path / "empty", steps=())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint; available steps: none"):
        find_checkpoint(empty)


@pytest.mark.parametrize("tool", [False, True], ids=["megatron-spell-export", "convert-tool"])
def test_export_command_lines_fail_clearly(tmp_path, tool, capsys):
    """Both export command lines: exit 2 and one `error:` line naming the path and the steps."""
    import importlib.util
    from pathlib import Path

    from megatron_spell.cli import main

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("m2hf", root / "tools/convert_megatron_to_hf.py")
    m2hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m2hf)
    run, _ = _run_dir(tmp_path)

    def export(src, *extra):
        out = str(tmp_path / "out")
        if tool:
            rc = m2hf.main(["--ckpt-dir", str(src), "--out-dir", out, *extra, "--quiet"])
        else:
            rc = main(["export", str(src), "--out", out, *extra, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, err
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        return line

    line = export(run, "--step", "9")
    assert "no checkpoint of step 9" in line and "available steps: 1, 2" in line
    assert "neither a converted checkpoint" in export(tmp_path)
    assert "does not exist" in export(tmp_path / "nope")
    assert not (tmp_path / "out").exists()
