"""Chat-template rendering to token ids, shared by training and evaluation (docs/spell-algorithm.md
§2.2, §8.1).

Every SPELL prompt is one user turn rendered with the tokenizer's chat template and the assistant
generation prompt (`add_generation_prompt=True`), straight to token ids (`tokenize=True`): the
engines take token ids, and rendering to text and re-encoding it can split the template's special
tokens differently. Training (gen_round) and evaluation (eval/protocol.py, eval/judge.py) both
render through `render_user_turn`, so an evaluation prompt is token-identical to the prompt of the
same question in training.

Deliberate deviation, evaluation only: with `allow_plain=True` a tokenizer without a chat template
gets the plain user message encoded without special tokens (logged once); the reference would fail.
Training keeps the error, since a policy trained on plain text would not be the chat model the run
claims.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)
_warned_no_template = False


class ChatRenderer(Protocol):
    """Turns one user message into prompt token ids, and counts the tokens of a text."""

    def render(self, user_text: str) -> list[int]: ...

    def count_tokens(self, text: str) -> int: ...


def render_user_turn(tokenizer: Any, user_text: str, *, allow_plain: bool = False) -> list[int]:
    """Token ids of `[{"role": "user", "content": user_text}]` with the assistant generation prompt."""
    global _warned_no_template
    if allow_plain and not getattr(tokenizer, "chat_template", None):
        if not _warned_no_template:
            logger.warning("tokenizer has no chat template; prompts are sent as plain text")
            _warned_no_template = True
        return [int(t) for t in tokenizer(user_text, add_special_tokens=False)["input_ids"]]
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of `text` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def as_chat_renderer(tokenizer: Any, *, allow_plain: bool = False) -> ChatRenderer:
    """Wrap a Hugging Face tokenizer as a `ChatRenderer` (one user turn, generation prompt added)."""

    class _Renderer:
        def render(self, user_text: str) -> list[int]:
            return render_user_turn(tokenizer, user_text, allow_plain=allow_plain)

        def count_tokens(self, text: str) -> int:
            return count_tokens(tokenizer, text)

    return _Renderer()
