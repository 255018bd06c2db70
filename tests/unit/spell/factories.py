"""Small builders of SPELL records for the spell/ unit tests."""

from megatron_spell.types import (
    Completion,
    QuestionerSample,
    ResponderGroup,
    Role,
    Task,
    Trajectory,
    VerifierGroup,
)


def traj(role: Role, task: Task, uid: str, reward: float = 0.0, **kw) -> Trajectory:
    completion = Completion(token_ids=(1, 2), text="t", logprobs=(-0.1, -0.2), finish_reason="stop")
    return Trajectory(
        role=role, task=task, uid=uid, prompt_ids=(7,), completion=completion, reward=reward, **kw
    )


def responder_group(uid: str, task: Task, rewards) -> ResponderGroup:
    return ResponderGroup(uid, task, tuple(traj(Role.RESPONDER, task, uid, r) for r in rewards))


def verifier_group(uid: str, task: Task, rewards) -> VerifierGroup:
    return VerifierGroup(uid, task, tuple(traj(Role.VERIFIER, task, uid, r) for r in rewards))


def questioner_sample(uid: str, task: Task, case=None) -> QuestionerSample:
    return QuestionerSample(uid, task, traj(Role.QUESTIONER, task, uid), case)
