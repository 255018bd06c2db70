"""One generation round with a scripted generator: cases, rewards, verifier candidates, history
(docs/spell-algorithm.md §1.1-§1.5)."""

import json

import pytest

from megatron_spell.config import SpellConfig
from megatron_spell.gen_round import QuestionerInput, run_gen_round
from megatron_spell.rollout.roles import RoleEngine
from megatron_spell.spell import prompts
from megatron_spell.types import CaseType, Completion, DocSet, Role, Task

DOCS = DocSet(
    data_source="hotpotqa_docs",
    question_id="row0",
    paragraphs=("Alpha doc about Alice.", "Beta doc.", "Gamma doc."),
)


class FakeChat:
    """render() gives each distinct text one token id; the generator maps it back."""

    def __init__(self):
        self.texts: list[str] = []

    def render(self, text):
        self.texts.append(text)
        return [len(self.texts) - 1]

    def count_tokens(self, text):
        return len(text.split())


def qa(question, answer):
    return "Reasoning.\n```json\n" + json.dumps({"question": question, "answer": answer}) + "\n```"


class FakeGenerator:
    def __init__(self, chat):
        self.chat = chat
        self.calls = []
        self.schemas = []

    def _respond(self, text, n):
        if text.startswith(prompts.questioner_prompt(Task.DOC_GENERAL_QA, ["x"])[:40]):
            if "Alpha" in text and "Beta" in text and "Gamma" not in text:
                return [qa("Who is in Alpha?", "Alice")]
            if "Gamma" in text and "Alpha" not in text:
                return ["I refuse to write JSON"]
            if "Beta" in text and "Alpha" not in text:
                return [qa("What is two plus two?", "four")]
            return [qa("Which doc mentions Alice?", "Alpha")]
        if text.startswith("Your job is to decide"):
            yes = "Answer 1: Alice" in text or "Answer 1: Alpha" in text
            if yes:
                return ["Same.\n[[YES]]"] * (n - 1) + ["NOT the same.\n[[NO]]"]
            return ["Different.\n[[NO]]"] * n
        no_ctx = f"<text>\n{prompts.NO_CONTEXT}\n</text>" in text
        if "two plus two" in text:
            return ["The correct answer is four"] * n
        if no_ctx:
            return ["The correct answer is unknown"] * n
        if "Who is in Alpha?" in text:
            return ["The correct answer is Alice"] * (n // 2) + ["The correct answer is Bob"] * (
                n - n // 2
            )
        if "Which doc mentions Alice?" in text:
            return ["The correct answer is Alpha"] * n
        return ["no idea"] * n

    def generate(self, prompt_ids, n, *, max_tokens=None, constraint=None):
        self.calls.append((len(prompt_ids), n))
        self.schemas.append(constraint)
        out = []
        for ids in prompt_ids:
            texts = self._respond(self.chat.texts[ids[0]], n)
            out.append(
                [
                    Completion(
                        token_ids=(1, 2), text=t, logprobs=(-0.1, -0.2), finish_reason="stop"
                    )
                    for t in texts
                ]
            )
        return out


def one_rank(gen, structured=()):
    """The round's role-level generator over a scripted engine on a single rank."""
    return RoleEngine(gen, structured=structured)


def run_round(gen, chat, inputs, spell, *, structured=(), uid_prefix="x"):
    """One round over `gen` on a single rank, responses capped at 8 tokens."""
    return run_gen_round(
        inputs,
        one_rank(gen, structured=structured),
        chat,
        spell,
        uid_prefix=uid_prefix,
        max_response_tokens=8,
    )


def test_round_cases_rewards_and_candidates():
    chat = FakeChat()
    gen = FakeGenerator(chat)
    inputs = [
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1)),  # good, mixed
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(2,)),  # bad format
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(1,)),  # bad ground
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1, 2)),  # all correct
    ]
    spell = SpellConfig(responder_n=4, verifier_n=4)
    res = run_gen_round(
        inputs, one_rank(gen), chat, spell, uid_prefix="s0r0", max_response_tokens=64
    )
    cases = {s.uid: s.case for s in res.questioner}
    assert cases == {
        "s0r0q0": None,
        "s0r0q1": CaseType.BAD_FORMAT,
        "s0r0q2": CaseType.BAD_GROUND,
        "s0r0q3": None,
    }
    # calls: questioner (4 prompts, n=1), pre-filter (3 parsed, n=1), responder (2 grounded, n=4), verifier
    assert gen.calls[:3] == [(4, 1), (3, 1), (2, 4)]
    groups = {g.uid: g for g in res.responder_groups}
    assert set(groups) == {"s0r0q0", "s0r0q3"}
    # verifier upgrades nothing here (it says NO to Bob): rewards equal the rule scores
    assert groups["s0r0q0"].rewards == (1.0, 1.0, 0.0, 0.0)
    assert groups["s0r0q3"].rewards == (1.0, 1.0, 1.0, 1.0)
    assert all(t.role is Role.RESPONDER for t in groups["s0r0q0"].trajectories)
    # every response is judged: 8 jobs; "Alice"/"Alpha" judged 3 YES + 1 NO (agreement 0.75, majority 1 =
    # rule 1: candidates); "Bob" judged 4 NO (unanimous, agreement 1.0 > 0.99: not a candidate)
    assert res.metrics["verifier/num_judged"] == 8
    assert len(res.verifier_candidates) == 6
    cand = res.verifier_candidates[0]
    assert [t.reward for t in cand.trajectories] == [1.0, 1.0, 1.0, 0.0]
    assert all(t.role is Role.VERIFIER for t in cand.trajectories)
    assert res.metrics["questioner/bad_format_frac"] == 0.25
    assert res.metrics["questioner/bad_ground_frac"] == 0.25
    assert res.metrics["questioner/overlong_dropped"] == 0
    assert res.metrics["responder/reward_mean"] == 0.75
    assert res.metrics["responder/answer_format_frac"] == 1.0  # every answer has its sentence
    rates = {h.entry.question: h.success_rate for h in res.history}
    assert rates == {"Who is in Alpha?": 0.5, "Which doc mentions Alice?": 1.0}
    assert res.history[0].entry.evidence == (0, 1)


def test_round_with_nothing_parsed_is_empty_not_a_crash():
    chat = FakeChat()
    gen = FakeGenerator(chat)
    inputs = [QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(2,))]
    res = run_round(gen, chat, inputs, SpellConfig())
    assert res.responder_groups == [] and res.verifier_candidates == []
    assert [s.case for s in res.questioner] == [CaseType.BAD_FORMAT]


def test_overlong_responder_prompt_is_dropped():
    chat = FakeChat()

    class Overlong(FakeGenerator):
        def generate(self, prompt_ids, n, *, max_tokens=None, constraint=None):
            out = super().generate(prompt_ids, n, max_tokens=max_tokens)
            return [
                [] if n > 1 else o for o in out
            ]  # the engine excludes the long responder prompts

    gen = Overlong(chat)
    inputs = [QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1))]
    res = run_round(gen, chat, inputs, SpellConfig(responder_n=2))
    assert res.responder_groups == [] and res.questioner == []
    assert res.metrics["responder/overlong_dropped"] == 1


def test_structured_roles_call_once_per_task_with_their_constraints():
    from megatron_spell.spell.schemas import output_constraint

    chat = FakeChat()
    gen = FakeGenerator(chat)
    inputs = [
        QuestionerInput(task=Task.DOC_MC, docset=DOCS, evidence=(2,)),
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1)),
        QuestionerInput(task=Task.DOC_MC, docset=DOCS, evidence=(1,)),
    ]
    res = run_round(
        gen,
        chat,
        inputs,
        SpellConfig(responder_n=2, verifier_n=2, verifier_tasks=("doc_general_qa",)),
        structured=("questioner", "responder"),
    )
    tasks = [Task.DOC_GENERAL_QA, Task.DOC_MC]  # in Task order; docmath_qa has no prompts: no call
    assert gen.calls[:2] == [(1, 1), (2, 1)]
    assert gen.schemas[:2] == [output_constraint("questioner", t) for t in tasks]
    # the grounding pre-filter and the responder are responder calls, constrained by task; here
    # only the general QA question parses, so the MC calls (no prompts) are not made
    general = output_constraint("responder", Task.DOC_GENERAL_QA)
    assert gen.calls[2:4] == [(1, 1), (1, 2)] and gen.schemas[2:4] == [general, general]
    assert gen.schemas[4:] == [None] * (len(gen.schemas) - 4)  # the verifier is not constrained
    assert [s.uid for s in res.questioner] == ["xq0", "xq1", "xq2"]  # results keep input order


def test_structured_verifier_is_one_call_with_the_decision_pattern():
    from megatron_spell.spell.schemas import VERIFIER_PATTERN

    chat = FakeChat()
    gen = FakeGenerator(chat)
    inputs = [QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1))]
    run_round(gen, chat, inputs, SpellConfig(responder_n=2, verifier_n=3), structured=("verifier",))
    assert gen.schemas[:3] == [None] * 3
    assert [c.regex for c in gen.schemas[3:]] == [VERIFIER_PATTERN]
    assert gen.calls[3][1] == 3


def test_overlong_questioner_prompt_is_counted_on_its_own():
    chat = FakeChat()

    class OverlongQuestioner(FakeGenerator):
        def generate(self, prompt_ids, n, *, max_tokens=None, constraint=None):
            out = super().generate(prompt_ids, n, max_tokens=max_tokens)
            if len(self.calls) == 1:  # the questioner call: the engine excludes the second prompt
                out[1] = []
            return out

    gen = OverlongQuestioner(chat)
    inputs = [
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1)),
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1, 2)),
    ]
    res = run_round(gen, chat, inputs, SpellConfig(responder_n=2))
    assert [s.uid for s in res.questioner] == ["xq0"]
    assert res.metrics["questioner/overlong_dropped"] == 1
    assert res.metrics["questioner/num_prompts"] == 2
    assert res.metrics["questioner/dropped_frac"] == 0.5  # all silent drops, the overlong one too
    assert res.metrics["questioner/parsed_frac"] == 0.5
    assert [g.uid for g in res.responder_groups] == ["xq0"]


def test_rounds_of_two_ranks_merge_to_the_round_of_all_prompts():
    """Each metric merges by its own reduction: splitting prompts over ranks changes no metric."""
    from megatron_spell.gen_round import merge_rounds

    inputs = [
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1)),
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(2,)),
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(1,)),
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 1, 2)),
        QuestionerInput(task=Task.DOC_GENERAL_QA, docset=DOCS, evidence=(0, 2)),
    ]
    spell = SpellConfig(responder_n=4, verifier_n=3)

    def one_round(part, prefix):
        chat = FakeChat()
        return run_round(FakeGenerator(chat), chat, part, spell, uid_prefix=prefix)

    whole = one_round(inputs, "a")
    merged = merge_rounds([one_round(inputs[:1], "p0"), one_round(inputs[1:], "p1")])
    assert set(merged.metrics) == set(whole.metrics)
    for key, value in whole.metrics.items():
        assert merged.metrics[key] == pytest.approx(value), key
    assert whole.metrics["questioner/num_prompts"] == 5
    assert 0 < whole.metrics["verifier/agreement"] < 1
    assert len(merged.responder_groups) == len(whole.responder_groups)
    assert [s.uid for s in merged.questioner][:1] == ["p0q0"]
