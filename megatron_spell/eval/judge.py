"""Optional LLM judge for evaluation (docs/spell-algorithm.md §8.2, `SPELL/eval/verify.py`): is the
gold answer in the prediction?

The judge is never required; the rule score alone is a complete evaluation. When enabled, the per-sample final
score is max(rule, judge) (§8.2). Two back ends produce the judge's text:
* `EngineJudge`: the same rollout engine that generated the answers (greedy, one sample);
* `OpenAIJudge`: any OpenAI-compatible `/chat/completions` endpoint, called with `urllib` from a thread pool,
  with retries. A request that still fails scores 0 and is counted, it does not stop the evaluation.

The judge prompt is written in our own words (it asks whether the key facts of the reference answer are present
in the candidate, accepting paraphrases and a 0.15 % numeric tolerance, and to end with [[YES]] or [[NO]]).

Decision parsing (deliberate deviation, D3 and §9 item 17): the reference scores 1 iff the text after
`</think>` contains the substring `YES` and not `NO`, so a word such as "NOT" or "NONE" flips a YES. We take the
**last** `[[YES]]`/`[[NO]]` marker (any case, inner spaces allowed) after the last `</think>`; without a marker,
the last standalone upper-case word `YES` or `NO`; otherwise NO.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from megatron_spell.chat import render_user_turn

logger = logging.getLogger(__name__)

JUDGE_TEMPLATE = """You are grading a candidate answer to a question about some documents. \
Do not try to solve the question yourself; only compare the two answers.

Decide whether the candidate answer states the key facts of the reference answer. Count it as a match when it \
says the same thing in other words, notation, units or formatting, and when numbers agree within a relative \
tolerance of 0.15%. Extra explanation in the candidate is fine unless it contradicts the reference or offers \
several different final answers.

Question: {question}

Reference answer: {reference}

Candidate answer: {prediction}

Explain your comparison in a few sentences, then give your decision on the last line as exactly [[YES]] \
(the candidate matches the reference) or [[NO]] (it does not)."""

# How much of a (possibly long, reasoning-heavy) response the judge sees: its final part holds the answer.
MAX_PREDICTION_CHARS = 2000

_MARKER = re.compile(r"\[\[\s*(yes|no)\s*\]\]", re.IGNORECASE)
_WORD = re.compile(r"\b(YES|NO)\b")


def judge_prompt(question: str, references: Sequence[str], prediction: str) -> str:
    """The judge's user message for one sample (the prediction is the response after `</think>`)."""
    answer = prediction.rsplit("</think>", 1)[-1].strip()
    if len(answer) > MAX_PREDICTION_CHARS:
        answer = "..." + answer[-MAX_PREDICTION_CHARS:]
    reference = (
        references[0] if len(references) == 1 else " | ".join(references) + " (any of these)"
    )
    return JUDGE_TEMPLATE.format(
        question=question, reference=reference, prediction=answer or "(empty)"
    )


def parse_judgement(text: str) -> float:
    """1.0 if the judge's final decision is YES, else 0.0. Never raises."""
    if not isinstance(text, str):
        return 0.0
    tail = text.rsplit("</think>", 1)[-1]
    markers = _MARKER.findall(tail)
    if markers:
        return 1.0 if markers[-1].upper() == "YES" else 0.0
    words = _WORD.findall(tail)
    return 1.0 if words and words[-1] == "YES" else 0.0


class JudgeBackend(Protocol):
    """Turns judge prompts (user messages) into the judge's raw output texts, one per prompt."""

    def complete(self, prompts: Sequence[str]) -> list[str]: ...


class EngineJudge:
    """Judge with the evaluation's own rollout engine: chat template, greedy decoding, one sample."""

    def __init__(self, engine: Any, tokenizer: Any, *, max_tokens: int, max_input_tokens: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_input_tokens = max_input_tokens

    def complete(self, prompts: Sequence[str]) -> list[str]:
        from megatron_spell.eval.protocol import middle_truncate

        if not prompts:
            return []
        ids = [
            middle_truncate(
                render_user_turn(self.tokenizer, p, allow_plain=True), self.max_input_tokens
            )
            for p in prompts
        ]
        outputs = self.engine.generate(
            ids, 1, max_tokens=self.max_tokens, temperature=0.0, top_p=1.0
        )
        return [group[0].text if group else "" for group in outputs]


class OpenAIJudge:
    """Judge through an OpenAI-compatible chat-completions endpoint (e.g. a vLLM server), stdlib only."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_tokens: int = 1024,
        timeout_s: float = 120.0,
        retries: int = 3,
        workers: int = 8,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url {base_url!r} must start with http:// or https://")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.retries = retries
        self.workers = workers
        self.num_failed = 0

    def _request(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0,
                "top_p": 1.0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as err:
                logger.warning("judge request failed (attempt %d): %s", attempt + 1, err)
                if attempt < self.retries:
                    time.sleep(min(2.0**attempt, 10.0))
        self.num_failed += 1
        return ""

    def complete(self, prompts: Sequence[str]) -> list[str]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._request, prompts))
