"""One generation round of SPELL (docs/spell-algorithm.md §1.1, the body of the `repeat:` loop;
§1.2-§1.5, §3.2-§3.4).

A round is five named steps, each returning a frozen record that the next one reads:

    ask        questioner (n=1) -> parse                                      -> Questions
    ground     grounding pre-filter (no-context responder, n=1)               -> GroundedQuestions
    respond    responder over all documents (n) -> rule scores                -> Responses
    judge      verifier (n per judged response) -> votes, training candidates -> Judgements
    score      Eq. 6 combined responder rewards, history-memory candidates    -> RoundResult

The round talks to the model only through `RoleGenerator.generate` on token ids and to the tokenizer through
`ChatRenderer`; it imports neither vLLM nor Megatron, so it runs unchanged with a scripted generator in unit
tests and with the colocated vLLM engine in training. The generator is role level: which calls reach the
engine (one per task with prompts for a constrained role, none without prompts) is decided in one
place, `rollout/roles.py`.

Decisions (§9):
* D6: silent drops (unclosed think, invalid docmath number, overlong answer, overlong questioner prompt,
  overlong responder prompt) are counted in `metrics` (`questioner/dropped_frac`, which includes the
  overlong questioner prompts that are also counted on their own as `questioner/overlong_dropped`, and
  `responder/overlong_dropped`), never trained on.
* §9 item 8: the pre-filter for doc_mc keeps the reference rule (one no-context sample, score >=
  threshold); `spell.filter_questioner_prompts=false` turns it off.
* Responses whose prediction does not parse are not judged (the reference's rule); their reward is the rule
  score (0).
* Metrics carry their reduction (`metrics.Sum`, `metrics.Mean`), so rounds of several rollout groups and of
  several rounds merge exactly (`merge_rounds`). The records of the steps are in `round_records.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from megatron_spell.chat import ChatRenderer
from megatron_spell.config import SpellConfig
from megatron_spell.metrics import Mean, Metric, Sum, merge_metrics
from megatron_spell.round_records import (
    GroundedQuestions,
    HistoryCandidate,
    Judgements,
    Question,
    QuestionerInput,
    Questions,
    ResponseGroup,
    Responses,
    RoundResult,
    merge_rounds,
)
from megatron_spell.spell import prompts, rewards, scorers, verifier
from megatron_spell.spell.parsing import is_bad_ground, parse_questioner
from megatron_spell.types import (
    CaseType,
    Completion,
    HistoryEntry,
    ParsedQA,
    QuestionerSample,
    ResponderGroup,
    Role,
    Task,
    Trajectory,
    VerifierGroup,
)

__all__ = [
    "QuestionerInput",
    "RoleGenerator",
    "RoundResult",
    "merge_rounds",
    "run_gen_round",
]

log = logging.getLogger(__name__)


class RoleGenerator(Protocol):
    """What a round needs from the rollout side (`rollout.roles.RoleEngine`).

    Completions of `prompts` (prompt i asks a `tasks[i]` question) for `role`, n per prompt; an excluded
    (overlong) prompt yields an empty list.
    """

    def generate(
        self,
        role: Role,
        tasks: Sequence[Task],
        prompts: Sequence[Sequence[int]],
        n: int,
        *,
        max_tokens: int | None = None,
    ) -> list[list[Completion]]: ...


def run_gen_round(
    inputs: Sequence[QuestionerInput],
    generator: RoleGenerator,
    chat: ChatRenderer,
    spell: SpellConfig,
    *,
    uid_prefix: str,
    max_response_tokens: int,
) -> RoundResult:
    """Run every role of one round on `inputs`; see the module docstring for the steps."""
    max_tokens = max_response_tokens
    questions = ask(
        inputs,
        generator=generator,
        chat=chat,
        spell=spell,
        uid_prefix=uid_prefix,
        max_tokens=max_tokens,
    )
    if spell.filter_questioner_prompts:
        grounded = ground(questions, generator=generator, chat=chat, spell=spell)
    else:
        grounded = GroundedQuestions(questions.parsed, frozenset(), metrics={}, seconds=0.0)
    responses = respond(
        grounded, generator=generator, chat=chat, spell=spell, max_tokens=max_tokens
    )
    judgements = judge(
        responses, generator=generator, chat=chat, spell=spell, max_tokens=max_tokens
    )
    return score(questions, grounded, responses, judgements, spell=spell)


def _timed_generate(
    generator: RoleGenerator,
    role: Role,
    tasks: Sequence[Task],
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    max_tokens: int | None,
) -> tuple[list[list[Completion]], float]:
    t0 = time.perf_counter()
    outputs = generator.generate(role, tasks, prompt_ids, n, max_tokens=max_tokens)
    return outputs, time.perf_counter() - t0


def ask(
    inputs: Sequence[QuestionerInput],
    *,
    generator: RoleGenerator,
    chat: ChatRenderer,
    spell: SpellConfig,
    uid_prefix: str,
    max_tokens: int,
) -> Questions:
    """The questioner writes one question per input; parse it (docs/spell-algorithm.md §1.2, §3.2)."""
    prompt_ids = [
        chat.render(
            prompts.questioner_prompt(
                inp.task, [inp.docset.paragraphs[i] for i in inp.evidence], list(inp.history)
            )
        )
        for inp in inputs
    ]
    outputs, seconds = _timed_generate(
        generator, Role.QUESTIONER, [inp.task for inp in inputs], prompt_ids, 1, max_tokens
    )
    samples: list[QuestionerSample] = []
    parsed_qs: list[Question] = []
    bad_format = dropped = overlong = 0
    for i, (inp, ids, outs) in enumerate(zip(inputs, prompt_ids, outputs, strict=True)):
        uid = f"{uid_prefix}q{i}"
        if not outs:  # the questioner prompt itself was over the length limit
            overlong += 1
            dropped += 1
            continue
        traj = Trajectory(
            role=Role.QUESTIONER, task=inp.task, uid=uid, prompt_ids=tuple(ids), completion=outs[0]
        )
        parsed = parse_questioner(
            inp.task,
            outs[0].text,
            count_tokens=chat.count_tokens,
            max_answer_tokens=spell.max_answer_tokens,
        )
        if isinstance(parsed, ParsedQA):
            parsed_qs.append(Question(inp, uid, traj, parsed))
            samples.append(QuestionerSample(uid=uid, task=inp.task, trajectory=traj))
        elif parsed.case is CaseType.BAD_FORMAT:
            bad_format += 1
            samples.append(
                QuestionerSample(uid=uid, task=inp.task, trajectory=traj, case=CaseType.BAD_FORMAT)
            )
        else:
            dropped += 1
    n = len(inputs)
    metrics: dict[str, Metric] = {
        "questioner/num_prompts": Sum(n),
        "questioner/parsed_frac": Mean(len(parsed_qs), n),
        "questioner/bad_format_frac": Mean(bad_format, n),
        "questioner/dropped_frac": Mean(dropped, n),
        "questioner/overlong_dropped": Sum(overlong),
        "questioner/docs_per_prompt": Mean(sum(len(x.evidence) for x in inputs), n),
        "questioner/with_history_frac": Mean(sum(1 for x in inputs if x.history), n),
        "questioner/response_tokens": Sum(sum(len(o[0].token_ids) for o in outputs if o)),
    }
    return Questions(tuple(samples), tuple(parsed_qs), n, metrics=metrics, seconds=seconds)


def ground(
    questions: Questions, *, generator: RoleGenerator, chat: ChatRenderer, spell: SpellConfig
) -> GroundedQuestions:
    """Answer each question without documents (n=1); a rule score >= threshold is bad_ground
    (docs/spell-algorithm.md §1.4)."""
    parsed = questions.parsed
    ids = [
        chat.render(prompts.responder_prompt(q.parsed.task, prompts.NO_CONTEXT, q.parsed.question))
        for q in parsed
    ]
    outputs, seconds = _timed_generate(
        generator, Role.RESPONDER, [q.parsed.task for q in parsed], ids, 1, None
    )
    kept, bad = [], set()
    for q, outs in zip(parsed, outputs, strict=True):
        scores = [
            scorers.score(q.parsed.task, o.text, q.parsed.answer, qa_metric=spell.doc_qa_metric)
            for o in outs
        ]
        if is_bad_ground(scores, spell.ground_threshold):
            bad.add(q.uid)
        else:
            kept.append(q)
    metrics = {"questioner/bad_ground_frac": Mean(len(bad), questions.num_prompts)}
    return GroundedQuestions(tuple(kept), frozenset(bad), metrics=metrics, seconds=seconds)


def respond(
    grounded: GroundedQuestions,
    *,
    generator: RoleGenerator,
    chat: ChatRenderer,
    spell: SpellConfig,
    max_tokens: int,
) -> Responses:
    """The responder answers each kept question n times over all its documents; rule scores
    (docs/spell-algorithm.md §3.1)."""
    questions = grounded.kept
    ids = [
        chat.render(
            prompts.responder_prompt(
                q.parsed.task, "\n".join(q.inp.docset.paragraphs), q.parsed.question
            )
        )
        for q in questions
    ]
    tasks = [q.parsed.task for q in questions]
    outputs, seconds = _timed_generate(
        generator, Role.RESPONDER, tasks, ids, spell.responder_n, max_tokens
    )
    groups, overlong = [], set()
    for q, pid, outs in zip(questions, ids, outputs, strict=True):
        if not outs:  # responder prompt over the limit: dropped without reward or penalty (§1.2)
            overlong.add(q.uid)
            continue
        task = q.parsed.task
        scores = tuple(
            scorers.score(task, o.text, q.parsed.answer, qa_metric=spell.doc_qa_metric)
            for o in outs
        )
        preds = tuple(scorers.parse_prediction(task, o.text) for o in outs)
        groups.append(ResponseGroup(q, tuple(pid), tuple(outs), scores, preds))
    metrics: dict[str, Metric] = {
        "responder/overlong_dropped": Sum(len(overlong)),
        "responder/response_tokens": Sum(
            sum(len(o.token_ids) for g in groups for o in g.completions)
        ),
    }
    return Responses(tuple(groups), frozenset(overlong), metrics=metrics, seconds=seconds)


def judge(
    responses: Responses,
    *,
    generator: RoleGenerator,
    chat: ChatRenderer,
    spell: SpellConfig,
    max_tokens: int,
) -> Judgements:
    """Judge every parsable response n times; majority votes; verifier training candidates
    (docs/spell-algorithm.md §3.3)."""
    jobs: list[tuple[ResponseGroup, int, list[int]]] = []  # (group, response index, prompt ids)
    for g in responses.groups:
        if g.question.parsed.task.value not in spell.verifier_tasks:
            continue
        for ri, pred in enumerate(g.predictions):
            if pred is not None:
                text = prompts.verifier_prompt(
                    g.question.parsed.question, pred, g.question.parsed.answer
                )
                jobs.append((g, ri, chat.render(text)))
    outputs, seconds = _timed_generate(
        generator,
        Role.VERIFIER,
        [g.question.parsed.task for g, _, _ in jobs],
        [pid for _, _, pid in jobs],
        spell.verifier_n,
        max_tokens,
    )
    majorities: dict[tuple[str, int], int] = {}
    candidates: list[VerifierGroup] = []
    votes_all, invalid, agree = 0, 0, []
    for (g, ri, pid), outs in zip(jobs, outputs, strict=True):
        if not outs:
            continue
        votes = [verifier.parse_vote(o.text) for o in outs]
        m = verifier.majority(votes)
        majorities[(g.question.uid, ri)] = m
        votes_all += len(votes)
        invalid += sum(1 for v in votes if v == verifier.INVALID)
        if m != verifier.INVALID:
            agree.append(verifier.agreement_ratio(votes, m))
        if spell.update_verifier and verifier.is_training_candidate(
            votes,
            g.scores[ri],
            label_type=spell.verifier_label,
            lower_bound=spell.verifier_lower,
            upper_bound=spell.verifier_upper,
        ):
            uid, task = f"{g.question.uid}r{ri}", g.question.parsed.task
            trajs = tuple(
                Trajectory(
                    role=Role.VERIFIER,
                    task=task,
                    uid=uid,
                    prompt_ids=tuple(pid),
                    completion=o,
                    reward=r,
                )
                for o, r in zip(outs, verifier.judgement_rewards(votes, m), strict=True)
            )
            candidates.append(VerifierGroup(uid=uid, task=task, trajectories=trajs))
    metrics: dict[str, Metric] = {
        "verifier/num_judged": Sum(len(jobs)),
        "verifier/invalid_vote_frac": Mean(invalid, votes_all),
        "verifier/agreement": Mean.of(agree),
        "verifier/num_candidates": Sum(len(candidates)),
    }
    return Judgements(majorities, tuple(candidates), metrics=metrics, seconds=seconds)


def score(
    questions: Questions,
    grounded: GroundedQuestions,
    responses: Responses,
    judgements: Judgements,
    *,
    spell: SpellConfig,
) -> RoundResult:
    """Eq. 6 responder rewards (rule score combined with the verifier majority), the questioner samples
    with their cases, and the history-memory candidates: the round's result."""
    groups: list[ResponderGroup] = []
    history: list[HistoryCandidate] = []
    records: list[dict] = []
    rule_all: list[float] = []
    final_all: list[float] = []
    formatted: list[bool] = []  # the answer parses (the task's answer sentence is there)
    for g in responses.groups:
        q = g.question
        final = [
            rewards.responder_reward(
                s, judgements.majorities.get((q.uid, ri), verifier.NOT_JUDGED), spell.reward_combine
            )
            for ri, s in enumerate(g.scores)
        ]
        rule_all += g.scores
        final_all += final
        formatted += [pred is not None for pred in g.predictions]
        trajs = tuple(
            Trajectory(
                role=Role.RESPONDER,
                task=q.parsed.task,
                uid=q.uid,
                prompt_ids=g.prompt_ids,
                completion=o,
                reward=r,
            )
            for o, r in zip(g.completions, final, strict=True)
        )
        groups.append(ResponderGroup(uid=q.uid, task=q.parsed.task, trajectories=trajs))
        history.append(
            HistoryCandidate(
                task=q.parsed.task,
                data_source=q.inp.docset.data_source,
                question_id=q.inp.docset.question_id,
                entry=HistoryEntry(
                    evidence=q.inp.evidence, question=q.parsed.question, answer=q.parsed.answer
                ),
                success_rate=sum(final) / len(final),
            )
        )
        records.append(
            {
                "uid": q.uid,
                "task": q.parsed.task.value,
                "question_id": q.inp.docset.question_id,
                "question": q.parsed.question,
                "answer": q.parsed.answer,
                "rule_scores": list(g.scores),
                "rewards": final,
                "responses": [o.text for o in g.completions],
            }
        )
    samples = [
        QuestionerSample(s.uid, s.task, s.trajectory, CaseType.BAD_GROUND)
        if s.uid in grounded.bad_ground
        else s
        for s in questions.samples
        if s.uid not in responses.overlong
    ]
    passed = sum(1 for g in groups if any(t.reward > 0 for t in g.trajectories))
    own: dict[str, Metric] = {
        "responder/rule_score_mean": Mean.of(rule_all),
        "responder/reward_mean": Mean.of(final_all),
        "responder/pass_rate": Mean(passed, len(groups)),
        "responder/answer_format_frac": Mean.of(formatted),
        "responder/num_groups": Sum(len(groups)),
    }
    parts = (questions, grounded, responses, judgements)
    return RoundResult(
        questioner=samples,
        responder_groups=groups,
        verifier_candidates=list(judgements.candidates),
        history=history,
        stats=merge_metrics([*(p.metrics for p in parts), own]),
        records=records,
        seconds={
            Role.QUESTIONER.value: questions.seconds,
            Role.RESPONDER.value: grounded.seconds + responses.seconds,
            Role.VERIFIER.value: judgements.seconds,
        },
    )
