"""Property tests: every parser and scorer survives arbitrary and adversarial text and classifies it.

"Classifies" means: the questioner parser returns a ParsedQA or a Rejected with a known case, scores are
0.0 or 1.0 (or a metric in [0, 1]), votes are in {1, 0, -1}, numbers are finite floats or None.
"""

import json
import math
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_spell.spell import parsing, scorers, verifier
from megatron_spell.types import CaseType, ParsedQA, Rejected, Task

ADVERSARIAL = [
    "__import__('os').system('echo pwned')",
    '```json\n{"question": "q", "answer": "__import__(\'os\').system(\'id\')"}\n```',
    "{" * 5000 + "}" * 5000,
    "[" * 3000,
    "```json\n" + '{"a":' * 2000 + "1" + "}" * 2000 + "\n```",
    "<think>" * 100,
    '<think>unclosed ```json\n{"question": "q", "answer": "a"}\n```',
    "</think>" * 50 + "The answer is 5",
    "\\boxed{" * 500,
    "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
    "the answer is " + "9" * 5000,
    "the answer is " + "1," * 3000,
    "answer is 1e99999",
    "answer is 10^10^10",
    "\x00\x01\x02\xff\ufffd" * 1000,
    "NaN",
    "inf",
    "-inf",
    "1/0",
    "0/0",
    "The correct answer is " + "A" * 100000,
    "x" * 2_000_000,
    "the answer is (" * 20000,
    "answer is " * 50000,
    "[[YES" * 50000,
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
texts = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.sampled_from(ADVERSARIAL),
    st.builds(
        lambda a, b: a + "```json\n" + b + "\n```",
        st.text(max_size=50),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda kids: (
                st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v)),
    ),
    st.builds(
        lambda q, a: (
            "```json\n"
            + json.dumps({"question": q, "answer": a, "options": {k: a for k in "ABCD"}})
            + "\n```"
        ),
        st.text(max_size=30),
        st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True)),
    ),
)


def check_parse(text):
    for task in list(Task) + ["unknown_task"]:
        out = parsing.parse_questioner(task, text, count_tokens=len)
        assert isinstance(out, (ParsedQA, Rejected))
        if isinstance(out, Rejected):
            assert out.case in (CaseType.BAD_FORMAT, CaseType.DROPPED)
        else:
            assert out.question and out.answer
            if task == Task.DOCMATH_QA:
                value = scorers.parse_number(out.answer)
                assert value is not None and value != 0 and math.isfinite(value)
            if task == Task.DOC_MC:
                assert out.answer in "ABCD"


def check_score(text, reference):
    for task in Task:
        s = scorers.score(task, text, reference)
        assert 0.0 <= s <= 1.0
        if task is not Task.DOC_GENERAL_QA:
            assert s in (0.0, 1.0)
        pred = scorers.parse_prediction(task, text)
        assert pred is None or isinstance(pred, str)
    value = scorers.parse_number(text)
    assert value is None or (isinstance(value, float) and math.isfinite(value))
    assert verifier.parse_vote(text) in (1, 0, -1)


@SETTINGS
@given(texts)
def test_questioner_parser_never_raises(text):
    check_parse(text)


@SETTINGS
@given(
    texts,
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(["5", "B", "Paris", "-3.5%", "The correct answer is C"]),
    ),
)
def test_scorers_and_votes_never_raise(text, reference):
    check_score(text, reference)
    check_score(reference, text[:200])


def test_adversarial_corpus_is_classified_quickly():
    start = time.perf_counter()
    for text in ADVERSARIAL:
        check_parse(text)
        check_score(text, "5")
        assert isinstance(parsing.extract_json(text), dict)
    assert time.perf_counter() - start < 20  # bounded work even on megabyte inputs


def test_code_in_answers_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path('{marker}').touch()"
    for text in (payload, f"the answer is {payload}", f"\\boxed{{{payload}}}"):
        check_score(text, payload)
        parsing.parse_questioner(Task.DOCMATH_QA, json.dumps({"question": "q", "answer": payload}))
    assert not marker.exists()
