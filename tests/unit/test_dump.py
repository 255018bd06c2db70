"""Rollout dumps: the training batch round-trips through JSONL; bad files fail naming path and line."""

import json

import pytest

from megatron_spell.dump import dump_batch, load_dumped_batch, trajectory_to_json
from megatron_spell.types import CaseType, Completion, Role, Task, TrainBatch, Trajectory


def traj(role, uid, reward, advantage, case=None):
    return Trajectory(
        role=role,
        task=Task.DOC_MC,
        uid=uid,
        prompt_ids=(1, 2, 3),
        completion=Completion(
            token_ids=(4, 5), text="t", logprobs=(-0.5, -1.25), finish_reason="stop"
        ),
        reward=reward,
        case=case,
        advantage=advantage,
    )


def test_batch_round_trips_and_records_are_written(tmp_path):
    batch = TrainBatch(
        responder=(traj(Role.RESPONDER, "q0", 1.0, 0.5),),
        questioner=(traj(Role.QUESTIONER, "q1", -1.0, -0.25, CaseType.BAD_FORMAT),),
        verifier=(traj(Role.VERIFIER, "q0r0", 0.0, 0.0),),
    )
    records = [{"uid": "q0", "rewards": [1.0]}, {"uid": "q2", "rewards": []}]
    path = dump_batch(batch, records, tmp_path, 7)
    assert path == tmp_path / "step_00000007.jsonl"
    assert load_dumped_batch(tmp_path, 7) == batch
    lines = (tmp_path / "step_00000007_rounds.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == records


def test_bad_dump_names_path_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="logging.dump_rollouts=true"):
        load_dumped_batch(tmp_path, 0)
    good = json.dumps(trajectory_to_json(traj(Role.RESPONDER, "q0", 1.0, 0.5)))
    (tmp_path / "step_00000000.jsonl").write_text(good + "\n\n" + '{"role": "responder"}\n')
    with pytest.raises(ValueError, match=r"step_00000000.jsonl:3: not a dumped trajectory"):
        load_dumped_batch(tmp_path, 0)
