"""The SPELL evaluation protocol (docs/spell-algorithm.md §8.1-§8.2): prompt, truncate, sample n,
score.

Per question:
1. the responder prompt of the question's task (`spell.prompts.responder_prompt`, §2.2) as one
   user turn, rendered to token ids with the tokenizer's chat template
   (`add_generation_prompt=True`) by the renderer training uses (`megatron_spell.chat`), so the
   prompt is token-identical to the training prompt;
2. if longer than `max_input_tokens` = L, the middle is cut: the first L // 2 and the last
   L - L // 2 tokens are kept (§8.1);
3. n samples at temperature 0.7, top_p 0.95 (defaults; top_k off) from the rollout engine, in
   batches of questions with a tqdm progress bar;
4. the rule score of every sample (`spell.scorers.score`: sub-EM strict for QA, letter match for MC,
   numeric match for DocMath), the best over the gold answers when there are several;
5. optionally the LLM judge (`eval.judge`) on QA/DocMath samples whose rule score is below 1 (or all
   with `judge_all`), never on multiple choice (as the reference); final score = max(rule, judge).

Deliberate deviations (§8.1 and §9 item 17):
* The truncated prompt is sent as token ids, not decoded to text and re-tokenised as in the
  reference, so the model sees exactly L tokens (decode/encode round trips can change the count).
* The reference's QA rule score reads a missing key and is always 0; we use the scorers'
  sub_em_strict.
* No per-request seed (it breaks the CPU engine, docs/platform.md, and may make the n samples
  identical); the engine is seeded once.
* A tokenizer without a chat template gets the plain user message (logged once;
  `chat.render_user_turn` with `allow_plain`); the reference would fail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from megatron_spell.chat import render_user_turn
from megatron_spell.eval.formats import EvalExample
from megatron_spell.eval.judge import JudgeBackend, judge_prompt, parse_judgement
from megatron_spell.eval.metrics import question_metrics
from megatron_spell.spell.prompts import responder_prompt
from megatron_spell.spell.scorers import score
from megatron_spell.types import Task

logger = logging.getLogger(__name__)


class Generator(Protocol):
    """What the protocol needs from the rollout engine (`rollout.engine.RolloutEngine` satisfies it)."""

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> list[list[Any]]: ...


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Sampling and scoring settings of one evaluation run (defaults: docs/spell-algorithm.md §8.1)."""

    n: int = 8
    max_input_tokens: int = 16384
    max_new_tokens: int = 10000
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 32  # questions per generate call (progress granularity)
    judge_all: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "max_input_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0.0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")


def middle_truncate(ids: Sequence[int], limit: int) -> list[int]:
    """Keep the first limit // 2 and the last limit - limit // 2 tokens when `ids` is longer than `limit`."""
    if limit < 1:
        raise ValueError(f"max input tokens must be >= 1, got {limit}")
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


def build_prompt(
    example: EvalExample, tokenizer: Any, max_input_tokens: int
) -> tuple[list[int], int]:
    """The (possibly middle-truncated) prompt ids of one example and its untruncated length."""
    text = responder_prompt(example.task, example.documents, example.question)
    ids = render_user_turn(tokenizer, text, allow_plain=True)
    return middle_truncate(ids, max_input_tokens), len(ids)


def rule_score(task: Task, prediction: str, references: Sequence[str]) -> float:
    """Best rule score of one response over the gold answers; untrusted text never raises."""
    best = 0.0
    for reference in references:
        try:
            best = max(best, float(score(task, prediction, reference)))
        except Exception:  # a scorer bug must not stop the evaluation; count it as wrong
            logger.exception("scorer failed on task %s; scored 0", task.value)
    return best


def _judge_scores(
    examples: Sequence[EvalExample],
    predictions: Sequence[Sequence[str]],
    rules: Sequence[Sequence[float]],
    judge: JudgeBackend,
    judge_all: bool,
) -> list[list[float | None]]:
    """Judge scores per sample; None where the judge is not run (MC, or rule already 1)."""
    out: list[list[float | None]] = [[None] * len(p) for p in predictions]
    slots, prompts = [], []
    for i, ex in enumerate(examples):
        if ex.task is Task.DOC_MC:
            continue
        for j, text in enumerate(predictions[i]):
            if judge_all or rules[i][j] < 1.0:
                slots.append((i, j))
                prompts.append(judge_prompt(ex.question, ex.references, text))
    if prompts:
        logger.info("judging %d samples", len(prompts))
        for (i, j), reply in zip(slots, judge.complete(prompts), strict=True):
            out[i][j] = parse_judgement(reply)
    return out


def evaluate(
    examples: Sequence[EvalExample],
    engine: Generator,
    tokenizer: Any,
    settings: EvalSettings,
    *,
    judge: JudgeBackend | None = None,
    ks: Sequence[int] = (1,),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the protocol on `examples`; returns one JSON-ready row per example (see `report.py`)."""
    from tqdm.auto import tqdm

    prompts = [build_prompt(ex, tokenizer, settings.max_input_tokens) for ex in examples]
    completions: list[list[Any]] = []
    bar = tqdm(total=len(examples), desc="eval generate", unit="question", disable=not progress)
    for start in range(0, len(examples), settings.batch_size):
        batch = [ids for ids, _ in prompts[start : start + settings.batch_size]]
        outs = engine.generate(
            batch,
            settings.n,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
        )
        if len(outs) != len(batch) or any(len(group) != settings.n for group in outs):
            raise RuntimeError(
                f"engine returned {[len(g) for g in outs]} samples for {len(batch)} prompts, "
                f"expected {settings.n} each (was a prompt longer than the engine's limit?)"
            )
        completions += outs
        bar.update(len(batch))
    bar.close()
    texts = [[c.text for c in group] for group in completions]
    rules = [
        [rule_score(ex.task, t, ex.references) for t in group]
        for ex, group in zip(examples, texts, strict=True)
    ]
    judged = (
        _judge_scores(examples, texts, rules, judge, settings.judge_all)
        if judge is not None
        else [[None] * len(g) for g in texts]
    )
    rows = []
    for ex, (ids, full_len), group, rule, jud in zip(
        examples, prompts, completions, rules, judged, strict=True
    ):
        final = [max(r, j) if j is not None else r for r, j in zip(rule, jud, strict=True)]
        mean, pass_at = question_metrics(final, ks)
        rows.append(
            {
                "id": ex.id,
                "benchmark": ex.benchmark,
                "task": ex.task.value,
                "question": ex.question,
                "references": list(ex.references),
                "prompt_tokens": len(ids),
                "prompt_tokens_untruncated": full_len,
                "truncated": full_len > len(ids),
                "predictions": [c.text for c in group],
                "finish_reasons": [c.finish_reason for c in group],
                "response_tokens": [len(c.token_ids) for c in group],
                "rule_scores": rule,
                "judge_scores": jud,
                "scores": final,
                "mean_at_n": mean,
                "pass_at_k": {str(k): v for k, v in pass_at.items()},
            }
        )
    return rows
