"""Rollout dumps (logging.dump_rollouts) and their replay (`train --replay DIR`).

Per step, `<run_dir>/rollouts/step_<step>.jsonl` holds the training batch, one trajectory per line (token ids,
logprobs, reward, advantage: enough to replay the update), and `step_<step>_rounds.jsonl` the per-question
records of the step's rounds (question, answer, rule scores, rewards, response texts) for reading.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_spell.types import CaseType, Completion, Role, Task, TrainBatch, Trajectory


def dump_batch(batch: TrainBatch, records: Iterable[dict], out_dir: Path, step: int) -> Path:
    """Write the step's training batch (replayable) and its per-question rollout records as JSONL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:08d}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for t in batch.trajectories:
            fh.write(json.dumps(trajectory_to_json(t)) + "\n")
    with open(out_dir / f"step_{step:08d}_rounds.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


def trajectory_to_json(t: Trajectory) -> dict[str, Any]:
    """A trajectory as JSON: ids, logprobs, text, reward, advantage and case."""
    return {
        "role": t.role.value,
        "task": t.task.value,
        "uid": t.uid,
        "case": t.case.value if t.case else None,
        "reward": t.reward,
        "advantage": t.advantage,
        "prompt_ids": list(t.prompt_ids),
        "response_ids": list(t.completion.token_ids),
        "logprobs": list(t.completion.logprobs),
        "text": t.completion.text,
        "finish_reason": t.completion.finish_reason,
    }


def trajectory_from_json(d: dict[str, Any]) -> Trajectory:
    """Inverse of `trajectory_to_json` (a dumped trajectory, with its reward and advantage)."""
    return Trajectory(
        role=Role(d["role"]),
        task=Task(d["task"]),
        uid=str(d["uid"]),
        prompt_ids=tuple(int(i) for i in d["prompt_ids"]),
        completion=Completion(
            token_ids=tuple(int(i) for i in d["response_ids"]),
            text=str(d.get("text", "")),
            logprobs=tuple(float(x) for x in d["logprobs"]),
            finish_reason=str(d.get("finish_reason", "stop")),
        ),
        reward=float(d["reward"]),
        case=CaseType(d["case"]) if d.get("case") else None,
        advantage=float(d["advantage"]),
    )


def load_dumped_batch(replay_dir: Path, step: int) -> TrainBatch:
    """The training batch that `dump_batch` wrote for `step` (ValueError names a bad line)."""
    path = Path(replay_dir) / f"step_{step:08d}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"--replay: {path} does not exist (dump rollouts with logging.dump_rollouts=true)"
        )
    parts: dict[Role, list[Trajectory]] = {r: [] for r in Role}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                t = trajectory_from_json(json.loads(line))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a dumped trajectory ({exc})") from exc
            parts[t.role].append(t)
    return TrainBatch(
        responder=tuple(parts[Role.RESPONDER]),
        questioner=tuple(parts[Role.QUESTIONER]),
        verifier=tuple(parts[Role.VERIFIER]),
    )
