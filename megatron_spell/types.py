"""Typed records passed between the phases of one SPELL step (docs/architecture.md, "Layout").

Every phase boundary of `loop.py` hands over one of these frozen records instead of dicts. Enums name the
roles, tasks and questioner cases of docs/spell-algorithm.md §1-§3.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Role(str, enum.Enum):
    """The three roles one policy plays (docs/spell-algorithm.md §1.2)."""

    QUESTIONER = "questioner"
    RESPONDER = "responder"
    VERIFIER = "verifier"


class Task(str, enum.Enum):
    """The three SPELL task types (docs/spell-algorithm.md §2)."""

    DOC_GENERAL_QA = "doc_general_qa"
    DOC_MC = "doc_mc"
    DOCMATH_QA = "docmath_qa"


@dataclass(frozen=True)
class OutputConstraint:
    """A structured-output constraint on one generate call: a JSON schema or a regular expression.

    Exactly one is set. The rollout engine hands it to vLLM's structured outputs; see spell/schemas.py for
    when SPELL uses them (a deviation for small models, off by default).
    """

    json_schema: dict | None = None
    regex: str | None = None

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (self.regex is None):
            raise ValueError("OutputConstraint: set exactly one of json_schema and regex")


@dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt, as the rollout engine returns it.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the rollout policy at the rollout temperature
    (the distribution the token was sampled from), so it can serve as the old log-prob of the GRPO update.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str  # "stop" | "length" | "abort"
    # MoE routing replay (train.routing_replay): the experts vLLM routed each prompt and response
    # token to, a `RoutedExperts` reference (None when not captured). Not compared, not dumped.
    routed_experts: RoutedExperts | None = field(default=None, compare=False, repr=False)


class RoutedExperts:
    """A completion's routing, held by the process that generated it; pickles as a reference.

    `data` is a numpy array [prompt + response tokens, MoE layers, top-k] of uint8 (< 256 experts;
    255 where vLLM computed no routing, e.g. the last response token, which is never fed back) or
    int16 (-1 there). The array stays in the generating process (`owner`, its global rank): a copy
    sent through an object collective (the loop all-gathers the rounds) carries only
    (owner, key), so the routing never travels whole; the update moves each sample's rows to the
    ranks that train it (mcore/routing_exchange.py). `release_all()` frees the process's arrays.
    """

    _held: dict[int, Any] = {}
    _next_key = 0
    _rank: int | None = None  # the global rank of this process (set by the first array held)

    def __init__(self, owner: int, key: int | None = None, data: Any = None) -> None:
        if key is None:
            key, RoutedExperts._next_key = RoutedExperts._next_key, RoutedExperts._next_key + 1
        self.owner, self.key = int(owner), int(key)
        if data is not None:
            RoutedExperts._rank = self.owner
            RoutedExperts._held[self.key] = data

    def __reduce__(self) -> tuple[Any, tuple[int, int]]:
        return (RoutedExperts, (self.owner, self.key))

    @property
    def data(self) -> Any:
        """The array, in the owner process while it is held; None elsewhere or once released."""
        if self.owner != RoutedExperts._rank:
            return None
        return RoutedExperts._held.get(self.key)

    @classmethod
    def release_all(cls) -> None:
        cls._held.clear()


class CaseType(str, enum.Enum):  # noqa: UP042 (same form as Role and Task)
    """Why a questioner sample is not a "good" case (docs/spell-algorithm.md §1.3-§1.5, §3.5).

    `BAD_FORMAT` (-1), `BAD_GROUND` (-0.5) and `ZERO_VARIANCE` (0) are penalised bad cases that can be
    sampled into the questioner part of the batch; `DROPPED` is a skip without penalty (unclosed think,
    invalid or boolean docmath number, overlong answer, overlong responder prompt) that is counted in
    metrics but never trained on. An overlong questioner prompt never produces a sample: it is counted as
    `questioner/overlong_dropped` (and in `questioner/dropped_frac`).
    """

    BAD_FORMAT = "bad_format"
    BAD_GROUND = "bad_ground"
    ZERO_VARIANCE = "zero_variance"
    DROPPED = "dropped"


@dataclass(frozen=True)
class DocSet:
    """One corpus row: a set of documents ("paragraphs") with its source and id
    (docs/spell-algorithm.md §7.2)."""

    data_source: str
    question_id: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class HistoryEntry:
    """One remembered successful question of a (task, data_source, question_id)
    (docs/spell-algorithm.md §4.1).

    `evidence` are the document indices the questioner saw; `question` is the responder-facing question text
    (for doc_mc the full block with choices) and `answer` the bare reference answer.
    """

    evidence: tuple[int, ...]
    question: str
    answer: str


@dataclass(frozen=True)
class ParsedQA:
    """A questioner output that parsed: the responder-facing question and the bare reference answer.

    `question` is what the responder and the verifier see (for doc_mc the question with its four choices);
    `raw_question` is the question field as written by the questioner.
    """

    task: Task
    question: str
    answer: str
    raw_question: str


@dataclass(frozen=True)
class Rejected:
    """A questioner output that did not produce a usable question, with its case and a short reason."""

    case: CaseType
    reason: str


@dataclass(frozen=True)
class Trajectory:
    """One sampled sequence of one role, ready for the update.

    `uid` is the group id: the questioner sample's own id (questioner), the question id shared by the n responses
    (responder), or the judged response's id shared by its n judgements (verifier). `case` is None for good
    samples and the questioner's bad case otherwise. `advantage` is filled by `spell.advantages`.
    """

    role: Role
    task: Task
    uid: str
    prompt_ids: tuple[int, ...]
    completion: Completion
    reward: float = 0.0
    case: CaseType | None = None
    advantage: float = 0.0


@dataclass(frozen=True)
class ResponderGroup:
    """The n responses to one question (one responder GRPO group), with their combined rewards."""

    uid: str
    task: Task
    trajectories: tuple[Trajectory, ...]

    @property
    def rewards(self) -> tuple[float, ...]:
        return tuple(t.reward for t in self.trajectories)


@dataclass(frozen=True)
class VerifierGroup:
    """The n judgements of one responder trajectory (one verifier GRPO group), with per-judgement rewards."""

    uid: str
    task: Task
    trajectories: tuple[Trajectory, ...]


@dataclass(frozen=True)
class QuestionerSample:
    """One questioner output of a gen round: its trajectory and its case (None while it is a good candidate)."""

    uid: str
    task: Task
    trajectory: Trajectory
    case: CaseType | None = None


@dataclass(frozen=True)
class TrainBatch:
    """The final batch of one step (docs/spell-algorithm.md §1.6): responder, questioner (good then
    bad), verifier parts."""

    responder: tuple[Trajectory, ...]
    questioner: tuple[Trajectory, ...]
    verifier: tuple[Trajectory, ...]

    @property
    def trajectories(self) -> tuple[Trajectory, ...]:
        """All trajectories in the reference's concatenation order: responder, questioner, verifier."""
        return self.responder + self.questioner + self.verifier
