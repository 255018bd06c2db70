"""Eq. 8-9 on hand-made batches, checked against numpy (unbiased std, eps 1e-6);
docs/spell-algorithm.md D7."""

import math

import numpy as np
import pytest

from megatron_spell.spell.advantages import group_normalize, trajectory_advantages, with_advantages
from megatron_spell.types import CaseType, Role, Task, TrainBatch
from tests.unit.spell.factories import traj

EPS = 1e-6


def numpy_z(values):
    v = np.asarray(values, dtype=np.float64)
    return (v - v.mean()) / (v.std(ddof=1) + EPS)


def test_group_normalize_matches_numpy():
    rewards = [1, 0, 0, 1, 1, 1, 1, 0, 0.5, 0.25]
    keys = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    got = group_normalize(rewards, keys)
    expected = np.concatenate([numpy_z(rewards[:4]), numpy_z(rewards[4:8]), numpy_z(rewards[8:])])
    assert got == pytest.approx(expected.tolist(), abs=1e-12)
    # hand value: [1,0,0,1] -> +-0.5 / sqrt(1/3)
    assert got[0] == pytest.approx(0.5 / math.sqrt(1 / 3), rel=1e-5)


def test_equal_rewards_give_zero_advantage():
    assert group_normalize([1.0, 1.0, 1.0], ["g"] * 3) == [0.0, 0.0, 0.0]


def test_roles_are_grouped_their_own_way():
    q = Role.QUESTIONER
    batch = [
        traj(Role.RESPONDER, Task.DOC_MC, "u1", 1.0),
        traj(Role.RESPONDER, Task.DOC_MC, "u1", 0.0),
        traj(Role.RESPONDER, Task.DOC_MC, "u2", 0.0),
        traj(Role.RESPONDER, Task.DOC_MC, "u2", 1.0),
        traj(Role.RESPONDER, Task.DOC_MC, "u2", 1.0),
        # questioner: per task over the batch, regardless of uid and case
        traj(q, Task.DOC_MC, "u1", 1.0),
        traj(q, Task.DOC_MC, "u2", 0.3247),
        traj(q, Task.DOC_MC, "x", -1.0, case=CaseType.BAD_FORMAT),
        traj(q, Task.DOCMATH_QA, "m1", 0.7548),
        traj(q, Task.DOCMATH_QA, "m2", -0.5, case=CaseType.BAD_GROUND),
        # verifier: per judged-response uid (may reuse a responder uid string)
        traj(Role.VERIFIER, Task.DOC_MC, "u1", 1.0),
        traj(Role.VERIFIER, Task.DOC_MC, "u1", 0.0),
        traj(Role.VERIFIER, Task.DOC_MC, "u1", -1.0),
    ]
    got = trajectory_advantages(batch)
    expected = np.concatenate(
        [
            numpy_z([1.0, 0.0]),
            numpy_z([0.0, 1.0, 1.0]),
            numpy_z([1.0, 0.3247, -1.0]),
            numpy_z([0.7548, -0.5]),
            numpy_z([1.0, 0.0, -1.0]),
        ]
    )
    assert got == pytest.approx(expected.tolist(), abs=1e-12)
    raw = trajectory_advantages(batch, questioner_group="none")
    assert raw[5:10] == [1.0, 0.3247, -1.0, 0.7548, -0.5]
    assert raw[:5] == got[:5]


def test_section9_single_sample_task_is_not_nan():
    """Decision (docs/spell-algorithm.md D7): one questioner sample of a task -> mean 0, std 1, so A
    = reward (no NaN)."""
    batch = [
        traj(Role.QUESTIONER, Task.DOC_MC, "a", -1.0, case=CaseType.BAD_FORMAT),
        traj(Role.QUESTIONER, Task.DOCMATH_QA, "b", 0.7548),
        traj(Role.RESPONDER, Task.DOC_MC, "solo", 1.0),
    ]
    got = trajectory_advantages(batch)
    assert all(math.isfinite(a) for a in got)
    assert got == pytest.approx([-1.0 / (1 + EPS), 0.7548 / (1 + EPS), 1.0 / (1 + EPS)])


def test_with_advantages_fills_records_in_order():
    batch = TrainBatch(
        responder=(
            traj(Role.RESPONDER, Task.DOC_MC, "u", 1.0),
            traj(Role.RESPONDER, Task.DOC_MC, "u", 0.0),
        ),
        questioner=(traj(Role.QUESTIONER, Task.DOC_MC, "u", 1.0),),
        verifier=(),
    )
    out = with_advantages(batch)
    assert [t.advantage for t in out.trajectories] == pytest.approx(
        trajectory_advantages(batch.trajectories)
    )
    assert out.responder[0].advantage > 0 > out.responder[1].advantage


def test_bad_arguments():
    with pytest.raises(ValueError, match="group keys"):
        group_normalize([1.0], [])
    with pytest.raises(ValueError, match="questioner_group"):
        trajectory_advantages([], questioner_group="task")
