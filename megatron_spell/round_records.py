"""The records of one generation round: each step of `gen_round` returns one, frozen, to the next.

    QuestionerInput -> Questions -> GroundedQuestions -> Responses -> Judgements -> RoundResult

A `RoundResult` is what the step loop accumulates, remembers (history candidates), dumps and logs; its
metrics carry their reduction (`metrics.Sum`, `metrics.Mean`), so `merge_rounds` combines the rounds of
several rollout groups, or of a step, exactly whatever a metric is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from megatron_spell.metrics import Metric, merge_metrics, values
from megatron_spell.types import (
    Completion,
    DocSet,
    HistoryEntry,
    ParsedQA,
    QuestionerSample,
    ResponderGroup,
    Task,
    Trajectory,
    VerifierGroup,
)


@dataclass(frozen=True)
class QuestionerInput:
    """One questioner prompt to make: the task, the row, the documents shown and the history examples."""

    task: Task
    docset: DocSet
    # indices into docset.paragraphs, in original order
    evidence: tuple[int, ...]
    history: tuple[HistoryEntry, ...] = ()


@dataclass(frozen=True)
class HistoryCandidate:
    """A question whose responder success passed to the memory gate decision (made by the caller)."""

    task: Task
    # the row's corpus: the memory is keyed by (task, data_source, question_id)
    data_source: str
    question_id: str
    entry: HistoryEntry
    success_rate: float


@dataclass(frozen=True)
class Question:
    """A questioner output that parsed, with the input it came from."""

    inp: QuestionerInput
    uid: str
    trajectory: Trajectory
    parsed: ParsedQA


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """What every step record carries (keyword-only, so each step's own fields come first)."""

    # the step's metrics, each with its reduction
    metrics: Mapping[str, Metric]
    # wall time of the step
    seconds: float


@dataclass(frozen=True)
class Questions(StepRecord):
    """The questioner step: the samples to train on and the parsed questions."""

    # one per prompt that produced a parsed or a bad_format output, in input order
    samples: tuple[QuestionerSample, ...]
    parsed: tuple[Question, ...]
    num_prompts: int


@dataclass(frozen=True)
class GroundedQuestions(StepRecord):
    """The grounding pre-filter: the questions kept, and those answered without the documents."""

    kept: tuple[Question, ...]
    # uids of the bad_ground questions (docs/spell-algorithm.md §1.4)
    bad_ground: frozenset[str]


@dataclass(frozen=True)
class ResponseGroup:
    """The n responses to one question, with their rule scores and parsed predictions."""

    question: Question
    prompt_ids: tuple[int, ...]
    completions: tuple[Completion, ...]
    scores: tuple[float, ...]
    predictions: tuple[str | None, ...]


@dataclass(frozen=True)
class Responses(StepRecord):
    """The responder step: one group per answered question."""

    groups: tuple[ResponseGroup, ...]
    # uids of the questions whose responder prompt was over the length limit (dropped,
    # docs/spell-algorithm.md §1.2)
    overlong: frozenset[str]


@dataclass(frozen=True)
class Judgements(StepRecord):
    """The verifier step: the majority vote per judged response and the verifier training groups."""

    # (question uid, response index) -> majority vote; responses not judged are absent
    majorities: Mapping[tuple[str, int], int]
    candidates: tuple[VerifierGroup, ...]


@dataclass(frozen=True)
class RoundResult:
    """One round (or the merge of several): what the step accumulates, remembers, dumps and logs."""

    questioner: list[QuestionerSample] = field(default_factory=list)
    responder_groups: list[ResponderGroup] = field(default_factory=list)
    verifier_candidates: list[VerifierGroup] = field(default_factory=list)
    history: list[HistoryCandidate] = field(default_factory=list)
    # each metric with its reduction; `metrics` gives their values
    stats: dict[str, Metric] = field(default_factory=dict)
    # per-question rollout dump (logging.dump_rollouts)
    records: list[dict] = field(default_factory=list)
    # generate wall time per role
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """The scalar value of every metric."""
        return values(self.stats)


def merge_rounds(results: Sequence[RoundResult]) -> RoundResult:
    """Concatenate rounds (of all rollout groups in rank order, or of a step) and merge their metrics,
    each by its own reduction. Generate time per role is the slowest part's (ranks generate at once)."""
    seconds: dict[str, float] = {}
    for r in results:
        for role, sec in r.seconds.items():
            seconds[role] = max(seconds.get(role, 0.0), sec)
    return RoundResult(
        questioner=[s for r in results for s in r.questioner],
        responder_groups=[g for r in results for g in r.responder_groups],
        verifier_candidates=[g for r in results for g in r.verifier_candidates],
        history=[h for r in results for h in r.history],
        stats=merge_metrics(r.stats for r in results),
        records=[rec for r in results for rec in r.records],
        seconds=seconds,
    )
