"""Chat-template rendering to token ids (we apply templates ourselves; the engine takes token ids).

`ChatTemplate` satisfies `gen_round.ChatRenderer` (render, count_tokens). The prompt is one user turn with
the generation prompt appended, as in the SPELL reference (spell-algorithm.md section 4: every role prompt is
a single user message).
"""

from __future__ import annotations

from typing import Any


def render_chat(tokenizer: Any, user_text: str) -> list[int]:
    """Token ids of `[{"role": "user", "content": user_text}]` with the assistant generation prompt."""
    messages = [{"role": "user", "content": user_text}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(
        ids, "input_ids"
    ):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


class ChatTemplate:
    """The policy tokenizer's chat template and token counting."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, model_dir: str) -> ChatTemplate:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir))

    def render(self, user_text: str) -> list[int]:
        return render_chat(self.tokenizer, user_text)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))
