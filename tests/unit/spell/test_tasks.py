"""The task registry: the built-in records, one routing rule, and a new task that needs no other edit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_spell.eval.formats import load_examples
from megatron_spell.eval.protocol import rule_score
from megatron_spell.spell import parsing, prompts, schemas, scorers, tasks
from megatron_spell.spell.tasks import TaskSpec
from megatron_spell.types import CaseType, ParsedQA, Rejected, Role, Task


def test_every_task_has_one_record_in_routing_order():
    assert tasks.names() == ("doc_mc", "doc_general_qa", "docmath_qa")
    assert {s.task for s in tasks.specs()} == set(Task)
    for task in Task:
        assert tasks.get(task) is tasks.get(task.value)
        assert tasks.get(task).task is task
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        tasks.get("poetry")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(tasks.get(Task.DOC_MC))


# data-source name -> task, the training scorer dispatch (docs/spell-algorithm.md §3.1)
ROUTES = [
    ("longbench_v2", Task.DOC_MC),
    ("LongBench-v2", Task.DOC_MC),
    ("ultrafineweb_doc_mc", Task.DOC_MC),
    ("longbench", Task.DOC_GENERAL_QA),
    ("frames", Task.DOC_GENERAL_QA),
    ("musique_e", Task.DOC_GENERAL_QA),
    ("hotpotqa_docs", Task.DOC_GENERAL_QA),
    ("2wikimqa", Task.DOC_GENERAL_QA),
    ("ultrafineweb_doc_general_qa", Task.DOC_GENERAL_QA),
    ("docmath_16K", Task.DOCMATH_QA),
    ("docmath_general_qa", Task.DOC_GENERAL_QA),  # general QA is asked before docmath
]


def _corpus_file(tmp_path: Path, data_source: str, **extra) -> Path:
    row = {"data_source": data_source, "paragraphs": ["p"], "question": "q", "answer": "7", **extra}
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize(("name", "task"), ROUTES)
def test_training_and_eval_route_a_data_source_alike(tmp_path, name, task):
    assert scorers.scorer_task(name) is task
    assert tasks.for_data_source(name).task is task
    (example,) = load_examples(_corpus_file(tmp_path, name))
    assert example.task is task


def test_unknown_data_source_is_an_error_in_training_and_eval(tmp_path):
    with pytest.raises(ValueError, match="no scorer for data source 'ultrafineweb_en'"):
        scorers.scorer_task("ultrafineweb_en")
    with pytest.raises(ValueError, match="record 0: .*'task' field.*--task"):
        load_examples(_corpus_file(tmp_path, "ultrafineweb_en"))
    # an explicit task field, or --task, settles it
    (ex,) = load_examples(_corpus_file(tmp_path, "ultrafineweb_en", task="docmath_qa"))
    assert ex.task is Task.DOCMATH_QA and ex.references == ("7",)
    (ex,) = load_examples(_corpus_file(tmp_path, "ultrafineweb_en"), task=Task.DOC_GENERAL_QA)
    assert ex.task is Task.DOC_GENERAL_QA


# texts that fully match each responder pattern at its extremes; the stricter answer parsers accept them
PATTERN_OUTPUTS = {
    Task.DOC_GENERAL_QA: [
        "The correct answer is x",
        "The correct answer is " + "Ada Lovelace." * 7,
    ],
    Task.DOC_MC: [f"The correct answer is {k}" for k in "ABCD"],
    Task.DOCMATH_QA: [
        "Therefore, the answer is 0",
        "Therefore, the answer is -123456789012.123456",
        "Therefore, the answer is 7.5",
    ],
}


@pytest.mark.parametrize("task", list(Task))
def test_responder_pattern_outputs_score_against_their_own_answer(task):
    pattern = re.compile(tasks.get(task).responder_pattern)
    for text in PATTERN_OUTPUTS[task]:
        assert pattern.fullmatch(text), text
        answer = scorers.parse_prediction(task, text)
        assert answer and text.rstrip(".").endswith(answer), (text, answer)
        assert scorers.score(task, text, answer) == 1.0


# a throwaway task: yes/no questions, answered "Verdict: yes" / "Verdict: no"
def _toy_parse_questioner(record, count_tokens, max_answer_tokens):
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or answer not in ("yes", "no"):
        return Rejected(CaseType.BAD_FORMAT, "toy_yesno: need a question and a yes/no answer")
    return ParsedQA(task="toy_yesno", question=question, answer=answer, raw_question=question)


def _toy_parse_prediction(text):
    found = re.findall(r"Verdict: (yes|no)\b", text)
    return found[-1] if found else None


TOY = TaskSpec(
    task="toy_yesno",
    questioner_rules=lambda letter: "Write ONE yes/no question about the documents.",
    questioner_json='```json\n{"question": "<q>", "answer": "<yes or no>"}\n```',
    escalation="Ways to make it harder: negations.",
    responder_template="<text>\n{documents}\n</text>\nQ: {question}\nEnd with 'Verdict: yes' or 'no'.",
    parse_questioner=_toy_parse_questioner,
    parse_prediction=_toy_parse_prediction,
    parse_reference=lambda ref: ref.strip().lower() or None,
    score=lambda pred, ref, metric: float(pred == ref),
    gold_text=lambda answer: "yes" if answer in (True, "yes") else "no",
    questioner_schema={
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"enum": ["yes", "no"]}},
        "required": ["question", "answer"],
    },
    responder_pattern=r"Verdict: (yes|no)",
    source_keywords=("toyset",),
)


@pytest.fixture
def toy_task():
    tasks.register(TOY)
    yield TOY
    tasks.unregister(TOY.task)
    assert tasks.find("toy_yesno") is None


def test_new_task_needs_no_edit_elsewhere(toy_task, tmp_path):
    assert tasks.names()[-1] == "toy_yesno"  # after the built-ins: they keep their routes
    # questioner prompt and parsing
    text = prompts.questioner_prompt("toy_yesno", ["Doc."], [("Is it?", "yes")])
    assert (
        "Write ONE yes/no question" in text
        and "negations" in text
        and "<text>\nDoc.\n</text>" in text
    )
    out = parsing.parse_questioner(
        "toy_yesno", '```json\n{"question": "Is it red?", "answer": "no"}\n```'
    )
    assert out == ParsedQA("toy_yesno", "Is it red?", "no", "Is it red?")
    bad = parsing.parse_questioner("toy_yesno", '{"question": "q", "answer": "maybe"}')
    assert isinstance(bad, Rejected) and bad.case is CaseType.BAD_FORMAT
    # responder prompt, prediction parsing and scoring, by task name and by data-source name
    assert prompts.responder_prompt("toy_yesno", "D", "Is it red?").endswith("'no'.")
    assert scorers.parse_prediction("toy_yesno", "hmm. Verdict: no") == "no"
    assert scorers.score("toy_yesno", "Verdict: no", "no") == 1.0
    assert scorers.score("toyset_dev", "Verdict: yes", "no") == 0.0
    assert scorers.scorer_task("toyset_dev") == "toy_yesno"
    # structured outputs
    assert (
        schemas.output_constraint(Role.QUESTIONER, "toy_yesno").json_schema == TOY.questioner_schema
    )
    assert schemas.output_constraint("responder", "toy_yesno").regex == TOY.responder_pattern
    assert schemas.RESPONDER_PATTERNS["toy_yesno"] == TOY.responder_pattern
    assert "toy_yesno" in list(schemas.SCHEMAS)
    # evaluation: a corpus row routed by its data source, gold rendered by the record, rule-scored
    path = _corpus_file(tmp_path, "toyset_dev", answer=True)
    (example,) = load_examples(path)
    assert (example.task, example.references) == ("toy_yesno", ("yes",))
    assert rule_score(example.task, "Verdict: yes", example.references) == 1.0
