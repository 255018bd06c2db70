"""Evaluation prompts are token-identical to training prompts (one shared chat renderer)."""

from __future__ import annotations

import pytest

from megatron_spell.chat import as_chat_renderer, count_tokens, render_user_turn
from megatron_spell.eval.formats import EvalExample, format_mc_question
from megatron_spell.eval.protocol import build_prompt
from megatron_spell.spell.prompts import responder_prompt
from megatron_spell.types import Task
from tests.helpers.tiny_models import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()  # a real PreTrainedTokenizerFast with a ChatML template


EXAMPLES = [
    EvalExample(
        "q1", "hotpotqa", Task.DOC_GENERAL_QA, "Ada wrote notes.\nBabbage built.", "Who?", ("Ada",)
    ),
    EvalExample(
        "q2",
        "longbench-v2",
        Task.DOC_MC,
        "Teal is 12.5% blue.",
        format_mc_question("Which colour?", {"A": "red", "B": "teal", "C": "x", "D": "y"}),
        ("B",),
    ),
    EvalExample("q3", "docmath", Task.DOCMATH_QA, "| 2019 | $1,200 |", "How much?", ("1200",)),
]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.task.value)
def test_eval_prompt_ids_equal_training_renderer(tokenizer, example):
    text = responder_prompt(example.task, example.documents, example.question)
    training = as_chat_renderer(tokenizer).render(text)  # what gen_round renders for this question
    ids, full = build_prompt(example, tokenizer, max_input_tokens=100_000)
    assert ids == training and full == len(training)
    # independent reference: the tokenizer's own chat template, tokenised in one go
    direct = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
    )
    assert training == list(getattr(direct, "input_ids", direct))
    # the template's special tokens are single ids, at the start of both turns
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 2


def test_renderer_counts_tokens_without_specials(tokenizer):
    text = "Ada wrote notes."
    assert count_tokens(tokenizer, text) == len(tokenizer.encode(text, add_special_tokens=False))
    assert as_chat_renderer(tokenizer).count_tokens(text) == count_tokens(tokenizer, text)


def test_plain_fallback_only_when_allowed(tokenizer):
    class NoTemplate:
        chat_template = None

        def __call__(self, text, add_special_tokens):
            return tokenizer(text, add_special_tokens=add_special_tokens)

        def apply_chat_template(self, *args, **kwargs):
            raise ValueError("no chat template")

    plain = NoTemplate()
    assert render_user_turn(plain, "hi there", allow_plain=True) == tokenizer.encode(
        "hi there", add_special_tokens=False
    )
    with pytest.raises(ValueError, match="no chat template"):
        render_user_turn(plain, "hi there")  # training keeps the error
