"""The evaluation protocol with a scripted engine: truncation, sampling arguments, rule/judge scores."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_spell.chat import render_user_turn
from megatron_spell.eval.formats import EvalExample, format_mc_question
from megatron_spell.eval.judge import EngineJudge, OpenAIJudge, judge_prompt, parse_judgement
from megatron_spell.eval.protocol import (
    EvalSettings,
    build_prompt,
    evaluate,
    middle_truncate,
)
from megatron_spell.spell.prompts import responder_prompt
from megatron_spell.types import Completion, Task
from tests.helpers.fake_judge import ChatHandler, serve


class CharTokenizer:
    """One token per character (ids = code points); a ChatML-like template."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is True and add_generation_prompt is True
        (msg,) = messages
        return [ord(ch) for ch in f"<u>{msg['content']}</u><a>"]

    def __call__(self, text, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [ord(ch) for ch in text]}


class ScriptedEngine:
    """Returns scripted completion texts per prompt (looked up by a marker in the decoded prompt)."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompts, n, *, max_tokens=None, temperature=None, top_p=None):
        self.calls.append(
            dict(num=len(prompts), n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        )
        out = []
        for ids in prompts:
            text = "".join(chr(i) for i in ids)
            key = next(k for k in self.script if k in text)
            texts = self.script[key]
            assert len(texts) == n
            out.append([Completion((1, 2), t, (0.0, 0.0), "stop") for t in texts])
        return out


def _examples() -> list[EvalExample]:
    mc_q = format_mc_question("Which colour? [mc]", {"A": "red", "B": "teal", "C": "x", "D": "y"})
    return [
        EvalExample(
            "q1",
            "hotpotqa",
            Task.DOC_GENERAL_QA,
            "doc",
            "Who? [qa]",
            ("Ada Quill", "Countess Lovelace"),
        ),
        EvalExample("q2", "longbench-v2", Task.DOC_MC, "doc", mc_q, ("B",)),
        EvalExample("q3", "docmath", Task.DOCMATH_QA, "doc", "How much? [math]", ("75",)),
    ]


SCRIPT = {
    "[qa]": [
        "The correct answer is Lady Ada Quill.",  # sub-EM: gold contained -> 1
        "The correct answer is Quill",  # 0 (gold not contained)
        "The correct answer is countess lovelace",  # the second gold answer -> 1
        "I do not know.",  # 0
    ],
    "[mc]": [
        "The correct answer is B",
        "The correct answer is (B)",
        "The correct answer is C",
        "B",
    ],
    "[math]": [
        "Therefore, the answer is 75.",
        "Therefore, the answer is 75.05",  # within 0.15 %
        "Therefore, the answer is -75",  # sign differs
        "\\boxed{7,500}%",  # scale x100 rule of docs/spell-algorithm.md §3.1.3
    ],
}


def test_middle_truncate() -> None:
    ids = list(range(10))
    assert middle_truncate(ids, 20) == ids
    assert middle_truncate(ids, 10) == ids
    assert middle_truncate(ids, 4) == [0, 1, 8, 9]
    assert middle_truncate(ids, 5) == [0, 1, 7, 8, 9]  # first L//2, last L - L//2
    assert middle_truncate(ids, 1) == [9]
    with pytest.raises(ValueError):
        middle_truncate(ids, 0)


def test_build_prompt_uses_responder_template_chat_and_truncation() -> None:
    tok = CharTokenizer()
    ex = _examples()[0]
    expected_text = f"<u>{responder_prompt(ex.task, ex.documents, ex.question)}</u><a>"
    ids, full = build_prompt(ex, tok, 100000)
    assert "".join(map(chr, ids)) == expected_text and full == len(expected_text)
    short, full2 = build_prompt(ex, tok, 41)
    assert full2 == full and len(short) == 41
    text = "".join(map(chr, short))
    assert text == expected_text[:20] + expected_text[-21:]
    assert text.endswith("Who? [qa]</u><a>")  # the question and generation prompt survive


def test_chat_token_ids_without_template() -> None:
    tok = CharTokenizer()
    tok.chat_template = None
    assert render_user_turn(tok, "hi", allow_plain=True) == [ord("h"), ord("i")]


def test_evaluate_rule_scores_and_sampling_arguments() -> None:
    engine = ScriptedEngine(SCRIPT)
    settings = EvalSettings(n=4, max_input_tokens=100000, max_new_tokens=64, batch_size=2)
    rows = evaluate(_examples(), engine, CharTokenizer(), settings, ks=(1, 2, 4), progress=False)
    assert [c["num"] for c in engine.calls] == [2, 1]  # batches of 2 questions
    assert all(
        c["n"] == 4 and c["temperature"] == 0.7 and c["top_p"] == 0.95 and c["max_tokens"] == 64
        for c in engine.calls
    )
    qa, mc, math_ = rows
    assert qa["rule_scores"] == [1.0, 0.0, 1.0, 0.0]
    assert mc["rule_scores"] == [1.0, 1.0, 0.0, 0.0]  # a bare "B" has no answer phrase
    assert math_["rule_scores"] == [1.0, 1.0, 0.0, 1.0]
    assert qa["scores"] == qa["rule_scores"] and qa["judge_scores"] == [None] * 4
    assert qa["mean_at_n"] == 0.5
    assert qa["pass_at_k"]["2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert math_["pass_at_k"]["4"] == 1.0
    assert qa["truncated"] is False and qa["prompt_tokens"] == qa["prompt_tokens_untruncated"]
    assert qa["references"] == ["Ada Quill", "Countess Lovelace"] and qa["task"] == "doc_general_qa"


class RecordingJudge:
    def __init__(self, reply: str):
        self.reply = reply
        self.prompts: list[str] = []

    def complete(self, prompts):
        self.prompts += prompts
        return [self.reply] * len(prompts)


def test_judge_is_max_with_rule_and_skips_mc_and_solved_samples() -> None:
    judge = RecordingJudge("They agree. [[YES]]")
    settings = EvalSettings(n=4, max_input_tokens=100000)
    rows = evaluate(
        _examples(), ScriptedEngine(SCRIPT), CharTokenizer(), settings, judge=judge, progress=False
    )
    qa, mc, math_ = rows
    assert len(judge.prompts) == 2 + 1  # QA samples 2, 4 and the docmath sample 3
    assert qa["judge_scores"] == [None, 1.0, None, 1.0] and qa["scores"] == [1.0] * 4
    assert mc["judge_scores"] == [None] * 4 and mc["scores"] == [1.0, 1.0, 0.0, 0.0]
    assert math_["scores"] == [1.0] * 4

    no = RecordingJudge("[[NO]]")
    rows = evaluate(
        _examples(),
        ScriptedEngine(SCRIPT),
        CharTokenizer(),
        EvalSettings(n=4, judge_all=True),
        judge=no,
        progress=False,
    )
    assert len(no.prompts) == 8  # every QA and docmath sample
    assert rows[0]["judge_scores"] == [0.0] * 4 and rows[0]["scores"] == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The facts match. [[YES]]", 1.0),
        ("[[NO]]", 0.0),
        ("It is NOT a paraphrase, NONE of it differs. [[YES]]", 1.0),
        ("Hmm [[YES]] ... on reflection [[NO]]", 0.0),
        ("[[ yes ]]", 1.0),
        ("<think>maybe [[NO]]</think> Final: [[YES]]", 1.0),
        ("<think>[[YES]]</think> nothing", 0.0),
        ("YES, they match", 1.0),
        ("NOT equivalent. NO", 0.0),
        ("KNOWN answer, NOTHING else. YES", 1.0),
        ("no decision", 0.0),
        ("", 0.0),
    ],
)
def test_parse_judgement(text: str, expected: float) -> None:
    assert parse_judgement(text) == expected


def test_judge_prompt_holds_question_reference_and_answer_tail() -> None:
    p = judge_prompt("Who?", ("Ada",), "<think>long</think> The correct answer is Ada")
    assert "Question: Who?" in p and "Reference answer: Ada" in p
    assert "Candidate answer: The correct answer is Ada" in p and "long" not in p
    assert "[[YES]]" in p and "[[NO]]" in p
    long = judge_prompt("Q", ("a", "b"), "x" * 5000 + "END")
    assert "a | b (any of these)" in long and "xEND" in long and len(long) < 3500


def test_engine_judge_is_greedy_single_sample() -> None:
    engine = ScriptedEngine({"Question:": ["[[YES]]"]})
    judge = EngineJudge(engine, CharTokenizer(), max_tokens=16, max_input_tokens=5000)
    assert judge.complete([judge_prompt("Q", ("a",), "b")]) == ["[[YES]]"]
    assert engine.calls == [dict(num=1, n=1, max_tokens=16, temperature=0.0, top_p=1.0)]


def test_openai_judge_over_http() -> None:
    seen: list[dict] = []

    class Handler(ChatHandler):
        def reply(self, body):
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            content = body["messages"][0]["content"]
            return "[[YES]]" if "Candidate answer: good" in content else "[[NO]]"

    server, url = serve(Handler)
    try:
        judge = OpenAIJudge(url, "judge-model", api_key="k", max_tokens=32, workers=2)
        prompts = [judge_prompt("Q", ("r",), "good"), judge_prompt("Q", ("r",), "bad")]
        assert [parse_judgement(t) for t in judge.complete(prompts)] == [1.0, 0.0]
    finally:
        server.shutdown()
    assert {s["path"] for s in seen} == {"/v1/chat/completions"}
    assert all(s["model"] == "judge-model" and s["temperature"] == 0.0 for s in seen)
    assert all(s["auth"] == "Bearer k" and s["max_tokens"] == 32 for s in seen)


def test_openai_judge_failure_scores_zero_without_raising() -> None:
    class Handler(ChatHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(500)
            self.end_headers()

    server, url = serve(Handler)
    try:
        judge = OpenAIJudge(url, "m", retries=0, workers=1)
        assert judge.complete(["x"]) == [""] and judge.num_failed == 1
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="--judge-url"):
        OpenAIJudge("localhost:8000", "m")


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="--n"):
        EvalSettings(n=0)
    with pytest.raises(ValueError, match="--top-p"):
        EvalSettings(top_p=0.0)
