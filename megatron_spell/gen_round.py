"""One generation round of SPELL (spec section 1.1, the body of the `repeat:` loop; sections 1.2-1.5, 3.2-3.4).

questioner (n=1) -> parse -> grounding pre-filter (no-context responder, n=1) -> responder over all documents
(n) -> rule scores -> verifier (n per judged response) -> votes -> combined responder rewards, verifier
judgement rewards and training candidates -> history-memory candidates.

The round talks to the model only through `Generator.generate` on token ids and to the tokenizer through
`ChatRenderer`; it imports neither vLLM nor Megatron, so it runs unchanged with a scripted generator in unit
tests and with the colocated vLLM engine in training.

Decisions (spec section 9):
* Item 9: silent drops (unclosed think, invalid docmath number, overlong answer, overlong responder prompt)
  are counted in `metrics` (`questioner/dropped_frac`, `responder/overlong_dropped`), never trained on.
* Item 8: the pre-filter for doc_mc keeps the reference rule (one no-context sample, score >= threshold);
  `spell.filter_questioner_prompts=false` turns it off.
* Responses whose prediction does not parse are not judged (the reference's rule); their reward is the rule
  score (0).
* `structured` (rollout.structured_outputs) constrains the named roles to the spec's formats (spell/schemas.py,
  a deviation for small models). A constrained phase makes one generate call per task, in `Task` order,
  whether or not this rank has prompts of that task, so that lockstep ranks make the same calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from megatron_spell.config import SpellConfig
from megatron_spell.spell import prompts, rewards, scorers, verifier
from megatron_spell.spell.parsing import is_bad_ground, parse_questioner
from megatron_spell.spell.schemas import output_constraint
from megatron_spell.types import (
    CaseType,
    Completion,
    DocSet,
    HistoryEntry,
    OutputConstraint,
    ParsedQA,
    QuestionerSample,
    ResponderGroup,
    Role,
    Task,
    Trajectory,
    VerifierGroup,
)

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What a round needs from the rollout engine. An excluded (overlong) prompt yields an empty list.

    A round calls `generate` the same number of times whatever its prompts (also with an empty list), because
    the engines of several ranks run vLLM data parallel in lockstep: every rank must enter every call.
    """

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        *,
        max_tokens: int | None = None,
        constraint: OutputConstraint | None = None,
    ) -> list[list[Completion]]: ...


class ChatRenderer(Protocol):
    """Chat template and token counting of the policy's tokenizer."""

    def render(self, user_text: str) -> list[int]: ...

    def count_tokens(self, text: str) -> int: ...


@dataclass(frozen=True)
class QuestionerInput:
    """One questioner prompt to make: the task, the row, the documents shown and the history examples."""

    task: Task
    docset: DocSet
    evidence: tuple[int, ...]  # indices into docset.paragraphs, in original order
    history: tuple[HistoryEntry, ...] = ()


@dataclass(frozen=True)
class HistoryCandidate:
    """A question whose responder success passed to the memory gate decision (made by the caller)."""

    task: Task
    question_id: str
    entry: HistoryEntry
    success_rate: float


@dataclass
class RoundResult:
    questioner: list[QuestionerSample] = field(default_factory=list)
    responder_groups: list[ResponderGroup] = field(default_factory=list)
    verifier_candidates: list[VerifierGroup] = field(default_factory=list)
    history: list[HistoryCandidate] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(
        default_factory=list
    )  # per-question rollout dump (logging.dump_rollouts)
    seconds: dict[str, float] = field(default_factory=dict)  # generate wall time per role


@dataclass
class _Question:
    inp: QuestionerInput
    uid: str
    trajectory: Trajectory
    parsed: ParsedQA


def _frac(num: int, den: int) -> float:
    return num / den if den else 0.0


def run_gen_round(
    inputs: Sequence[QuestionerInput],
    generator: Generator,
    chat: ChatRenderer,
    spell: SpellConfig,
    *,
    uid_prefix: str,
    max_response_tokens: int,
    structured: Collection[str] = (),
) -> RoundResult:
    """Run every role of one round on `inputs`; see the module docstring for the order.

    `structured` names the roles constrained to the spec's formats (rollout.structured_outputs).
    """
    result = RoundResult()
    gen = _RoleGenerator(generator, structured, result.seconds)
    questions = _questioner_phase(inputs, gen, chat, spell, uid_prefix, max_response_tokens, result)
    if spell.filter_questioner_prompts:
        questions = _grounding_filter(questions, gen, chat, spell, result)
    groups = _responder_phase(questions, gen, chat, spell, max_response_tokens, result)
    _verifier_phase(questions, groups, gen, chat, spell, max_response_tokens, result)
    return result


class _RoleGenerator:
    """`Generator` calls per role: plain, or one constrained call per task (lockstep ranks)."""

    def __init__(
        self, generator: Generator, structured: Collection[str], seconds: dict[str, float]
    ):
        self._gen, self._structured = generator, {Role(r) for r in structured}
        self._seconds = seconds

    def __call__(self, role, tasks, prompt_ids, n, max_tokens) -> list[list[Completion]]:
        """Completions of `prompt_ids` (prompt i asks a `tasks[i]` question) for `role`, n per prompt."""
        t0 = time.perf_counter()
        try:
            return self._generate(role, tasks, prompt_ids, n, max_tokens)
        finally:
            key = role.value
            self._seconds[key] = self._seconds.get(key, 0.0) + time.perf_counter() - t0

    def _generate(self, role, tasks, prompt_ids, n, max_tokens) -> list[list[Completion]]:
        if role not in self._structured:
            return self._gen.generate(prompt_ids, n, max_tokens=max_tokens)
        if role is Role.VERIFIER:  # one format for every task
            return self._gen.generate(
                prompt_ids, n, max_tokens=max_tokens, constraint=output_constraint(role)
            )
        outputs: list[list[Completion]] = [[] for _ in prompt_ids]
        # every task, present on this rank or not: engines of several ranks must make the same calls (an
        # empty call costs one dummy token in lockstep, nothing on one rank)
        for task in Task:
            idx = [i for i, t in enumerate(tasks) if t is task]
            outs = self._gen.generate(
                [prompt_ids[i] for i in idx],
                n,
                max_tokens=max_tokens,
                constraint=output_constraint(role, task),
            )
            for i, o in zip(idx, outs):
                outputs[i] = o
        return outputs


def _questioner_phase(inputs, gen, chat, spell, uid_prefix, max_tokens, result) -> list[_Question]:
    prompt_ids = [
        chat.render(
            prompts.questioner_prompt(
                inp.task, [inp.docset.paragraphs[i] for i in inp.evidence], list(inp.history)
            )
        )
        for inp in inputs
    ]
    outputs = gen(Role.QUESTIONER, [inp.task for inp in inputs], prompt_ids, 1, max_tokens)
    questions: list[_Question] = []
    cases = {"bad_format": 0, "dropped": 0}
    for i, (inp, ids, outs) in enumerate(zip(inputs, prompt_ids, outputs)):
        uid = f"{uid_prefix}q{i}"
        if not outs:  # the questioner prompt itself was over the length limit
            cases["dropped"] += 1
            continue
        comp = outs[0]
        traj = Trajectory(
            role=Role.QUESTIONER, task=inp.task, uid=uid, prompt_ids=tuple(ids), completion=comp
        )
        parsed = parse_questioner(
            inp.task,
            comp.text,
            count_tokens=chat.count_tokens,
            max_answer_tokens=spell.max_answer_tokens,
        )
        if isinstance(parsed, ParsedQA):
            questions.append(_Question(inp, uid, traj, parsed))
            result.questioner.append(QuestionerSample(uid=uid, task=inp.task, trajectory=traj))
        elif parsed.case is CaseType.BAD_FORMAT:
            cases["bad_format"] += 1
            result.questioner.append(
                QuestionerSample(uid=uid, task=inp.task, trajectory=traj, case=CaseType.BAD_FORMAT)
            )
        else:
            cases["dropped"] += 1
    n = len(inputs)
    result.metrics.update(
        {
            "questioner/num_prompts": n,
            "questioner/parsed_frac": _frac(len(questions), n),
            "questioner/bad_format_frac": _frac(cases["bad_format"], n),
            "questioner/dropped_frac": _frac(cases["dropped"], n),
            "questioner/docs_per_prompt": _frac(sum(len(x.evidence) for x in inputs), n),
            "questioner/with_history_frac": _frac(sum(1 for x in inputs if x.history), n),
            "questioner/response_tokens": sum(len(o[0].token_ids) for o in outputs if o),
        }
    )
    return questions


def _mark(result: RoundResult, uid: str, case: CaseType) -> None:
    for i, sample in enumerate(result.questioner):
        if sample.uid == uid:
            result.questioner[i] = QuestionerSample(
                uid=uid, task=sample.task, trajectory=sample.trajectory, case=case
            )


def _grounding_filter(questions, gen, chat, spell, result) -> list[_Question]:
    """Answer each question without documents (n=1); a rule score >= threshold is bad_ground (spec 1.4)."""
    ids = [
        chat.render(prompts.responder_prompt(q.parsed.task, prompts.NO_CONTEXT, q.parsed.question))
        for q in questions
    ]
    outputs = gen(Role.RESPONDER, [q.parsed.task for q in questions], ids, 1, None)
    kept = []
    for q, outs in zip(questions, outputs):
        scores = [
            scorers.score(q.parsed.task, o.text, q.parsed.answer, qa_metric=spell.doc_qa_metric)
            for o in outs
        ]
        if is_bad_ground(scores, spell.ground_threshold):
            _mark(result, q.uid, CaseType.BAD_GROUND)
        else:
            kept.append(q)
    result.metrics["questioner/bad_ground_frac"] = _frac(
        len(questions) - len(kept), int(result.metrics.get("questioner/num_prompts", 0))
    )
    return kept


@dataclass
class _Responses:
    question: _Question
    completions: list[Completion]
    prompt_ids: tuple[int, ...]
    scores: list[float]
    predictions: list[str | None]


def _responder_phase(questions, gen, chat, spell, max_tokens, result) -> list[_Responses]:
    ids = []
    for q in questions:
        docs = "\n".join(q.inp.docset.paragraphs)
        ids.append(chat.render(prompts.responder_prompt(q.parsed.task, docs, q.parsed.question)))
    tasks = [q.parsed.task for q in questions]
    outputs = gen(Role.RESPONDER, tasks, ids, spell.responder_n, max_tokens)
    groups, overlong = [], 0
    for q, pid, outs in zip(questions, ids, outputs):
        if (
            not outs
        ):  # responder prompt over the limit: dropped without reward or penalty (spec 1.2)
            overlong += 1
            _drop(result, q.uid)
            continue
        task = q.parsed.task
        scores = [
            scorers.score(task, o.text, q.parsed.answer, qa_metric=spell.doc_qa_metric)
            for o in outs
        ]
        preds = [scorers.parse_prediction(task, o.text) for o in outs]
        groups.append(_Responses(q, list(outs), tuple(pid), scores, preds))
    result.metrics["responder/overlong_dropped"] = overlong
    result.metrics["responder/response_tokens"] = sum(
        len(o.token_ids) for g in groups for o in g.completions
    )
    return groups


def _drop(result: RoundResult, uid: str) -> None:
    result.questioner = [s for s in result.questioner if s.uid != uid]


def _verifier_phase(questions, groups, gen, chat, spell, max_tokens, result) -> None:
    """Judge every parsable response n times; combine rewards; pick verifier training candidates."""
    jobs = []  # (group index, response index, prompt ids)
    for gi, g in enumerate(groups):
        if g.question.parsed.task.value not in spell.verifier_tasks:
            continue
        for ri, pred in enumerate(g.predictions):
            if pred is not None:
                text = prompts.verifier_prompt(
                    g.question.parsed.question, pred, g.question.parsed.answer
                )
                jobs.append((gi, ri, chat.render(text)))
    outputs = gen(Role.VERIFIER, (), [j[2] for j in jobs], spell.verifier_n, max_tokens)
    majorities: dict[tuple[int, int], int] = {}
    votes_all, invalid, agree = 0, 0, []
    for (gi, ri, pid), outs in zip(jobs, outputs):
        if not outs:
            continue
        votes = [verifier.parse_vote(o.text) for o in outs]
        m = verifier.majority(votes)
        majorities[(gi, ri)] = m
        votes_all += len(votes)
        invalid += sum(1 for v in votes if v == verifier.INVALID)
        if m != verifier.INVALID:
            agree.append(verifier.agreement_ratio(votes, m))
        rule = groups[gi].scores[ri]
        if spell.update_verifier and verifier.is_training_candidate(
            votes,
            rule,
            label_type=spell.verifier_label,
            lower_bound=spell.verifier_lower,
            upper_bound=spell.verifier_upper,
        ):
            uid = f"{groups[gi].question.uid}r{ri}"
            rewards_j = verifier.judgement_rewards(votes, m)
            trajs = tuple(
                Trajectory(
                    role=Role.VERIFIER,
                    task=groups[gi].question.parsed.task,
                    uid=uid,
                    prompt_ids=tuple(pid),
                    completion=o,
                    reward=r,
                )
                for o, r in zip(outs, rewards_j)
            )
            result.verifier_candidates.append(
                VerifierGroup(uid=uid, task=groups[gi].question.parsed.task, trajectories=trajs)
            )
    _assemble_groups(groups, majorities, spell, result)
    result.metrics.update(
        {
            "verifier/num_judged": len(jobs),
            "verifier/invalid_vote_frac": _frac(invalid, votes_all),
            "verifier/agreement": sum(agree) / len(agree) if agree else 0.0,
            "verifier/num_candidates": len(result.verifier_candidates),
        }
    )


def _assemble_groups(groups, majorities, spell, result) -> None:
    rule_all, final_all = [], []
    for gi, g in enumerate(groups):
        q = g.question
        final = [
            rewards.responder_reward(s, majorities.get((gi, ri), -100), spell.reward_combine)
            for ri, s in enumerate(g.scores)
        ]
        rule_all += g.scores
        final_all += final
        trajs = tuple(
            Trajectory(
                role=Role.RESPONDER,
                task=q.parsed.task,
                uid=q.uid,
                prompt_ids=g.prompt_ids,
                completion=o,
                reward=r,
            )
            for o, r in zip(g.completions, final)
        )
        result.responder_groups.append(
            ResponderGroup(uid=q.uid, task=q.parsed.task, trajectories=trajs)
        )
        rate = sum(final) / len(final)
        result.history.append(
            HistoryCandidate(
                task=q.parsed.task,
                question_id=q.inp.docset.question_id,
                entry=HistoryEntry(
                    evidence=q.inp.evidence, question=q.parsed.question, answer=q.parsed.answer
                ),
                success_rate=rate,
            )
        )
        result.records.append(
            {
                "uid": q.uid,
                "task": q.parsed.task.value,
                "question_id": q.inp.docset.question_id,
                "question": q.parsed.question,
                "answer": q.parsed.answer,
                "rule_scores": g.scores,
                "rewards": final,
                "responses": [o.text for o in g.completions],
            }
        )
    result.metrics["responder/rule_score_mean"] = sum(rule_all) / len(rule_all) if rule_all else 0.0
    result.metrics["responder/reward_mean"] = sum(final_all) / len(final_all) if final_all else 0.0
    result.metrics["responder/pass_rate"] = (
        sum(1 for g in result.responder_groups if any(t.reward > 0 for t in g.trajectories))
        / len(result.responder_groups)
        if result.responder_groups
        else 0.0
    )
    result.metrics["responder/num_groups"] = len(result.responder_groups)


def as_chat_renderer(tokenizer) -> ChatRenderer:
    """Wrap a Hugging Face tokenizer: one user turn, generation prompt added (spec 2.2)."""

    class _Renderer:
        def render(self, user_text: str) -> list[int]:
            out = tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(out, dict) or hasattr(out, "input_ids"):
                out = out["input_ids"]
            return list(out)

        def count_tokens(self, text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return _Renderer()


_SUMMED = ("num_", "_tokens", "overlong_dropped", "num_candidates")


def merge_rounds(results: Sequence[RoundResult]) -> RoundResult:
    """Concatenate the rounds of all rollout groups (rank order) and combine their metrics.

    Counts (`num_*`, `*_tokens`, drops) are summed; fractions and means are averaged weighted by each part's
    number of questioner prompts (responder/verifier means by their group and judgement counts).
    """
    merged = RoundResult()
    for r in results:
        merged.questioner += r.questioner
        merged.responder_groups += r.responder_groups
        merged.verifier_candidates += r.verifier_candidates
        merged.history += r.history
        merged.records += r.records
        for role, sec in r.seconds.items():  # ranks generate concurrently: the slowest one counts
            merged.seconds[role] = max(merged.seconds.get(role, 0.0), sec)
    keys = {k for r in results for k in r.metrics}
    for key in keys:
        parts = [r for r in results if key in r.metrics]
        if any(s in key for s in _SUMMED):
            merged.metrics[key] = float(sum(r.metrics[key] for r in parts))
            continue
        weight_key = (
            "responder/num_groups"
            if key.startswith("responder/")
            else "verifier/num_judged"
            if key.startswith("verifier/")
            else "questioner/num_prompts"
        )
        weights = [r.metrics.get(weight_key, 0.0) for r in parts]
        total = sum(weights)
        if total:
            merged.metrics[key] = sum(w * r.metrics[key] for w, r in zip(weights, parts)) / total
        else:
            merged.metrics[key] = sum(r.metrics[key] for r in parts) / len(parts)
    return merged
