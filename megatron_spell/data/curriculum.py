"""Which documents the questioner sees: the memory-driven growth plus an optional explicit schedule
(docs/spell-algorithm.md §1.2, §4.1 and §4.2).

Memory-driven growth (the reference's only curriculum): without history a row's questioner sees `n` documents
drawn uniformly without replacement (`n` drawn from `n_docs[<source prefix>]`, [5] in the reference, [3] when
the prefix has no list); with history it sees the union of the remembered evidence plus `n` fresh documents from
those not yet used (all of them if fewer remain). Indices are returned sorted, i.e. in original order. So the
context grows 5 -> 10 -> 15 ... as successful questions accumulate; the responder always sees the whole row.

Explicit schedule (our addition, optional): `CurriculumSchedule` caps the questioner's context per stage by a
number of documents and/or a number of tokens; the stage advances every `steps_per_stage` optimizer steps and
stays at the last stage afterwards. When a cap is tighter than the remembered evidence, the evidence is
subsampled with the same RNG; at least one document is always shown.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatron_spell.data.corpus import source_prefix
from megatron_spell.data.history import evidence_union
from megatron_spell.types import HistoryEntry

# `SPELL/verl/verl/utils/dataset/spell_dataset.py:307,332`: used when no list is configured for a
# source
FALLBACK_N_DOCS = (3,)


def draw_num_new_docs(
    n_docs: Mapping[str, Sequence[int]], data_source: str, rng: random.Random
) -> int:
    """`n` for one prompt: uniform over the list of the source prefix, else "default", else [3]."""
    choices = n_docs.get(source_prefix(data_source)) or n_docs.get("default") or FALLBACK_N_DOCS
    n = int(rng.choice(list(choices)))
    if n < 1:
        raise ValueError(f"data.n_docs for {data_source!r} contains {n}; counts must be >= 1")
    return n


def _cap(
    evidence: list[int],
    new: list[int],
    rng: random.Random,
    max_docs: int | None,
    max_tokens: int | None,
    doc_tokens: Sequence[int] | None,
) -> list[int]:
    if max_docs is not None and len(evidence) > max_docs:
        evidence = rng.sample(evidence, max_docs)
    picked = list(evidence)
    if max_tokens is not None:
        if doc_tokens is None:
            raise ValueError("a token cap needs doc_tokens (token count of each document)")
        rng.shuffle(picked)
        kept, total = [], 0
        for i in picked:
            if total + doc_tokens[i] <= max_tokens or not kept:
                kept.append(i)
                total += doc_tokens[i]
        picked = kept
    budget = None if max_docs is None else max_docs - len(picked)
    total = sum(doc_tokens[i] for i in picked) if max_tokens is not None and doc_tokens else 0
    for i in new:
        if budget is not None and budget <= 0:
            break
        if max_tokens is not None and doc_tokens is not None:
            if picked and total + doc_tokens[i] > max_tokens:
                continue
            total += doc_tokens[i]
        picked.append(i)
        if budget is not None:
            budget -= 1
    return sorted(picked)


def select_documents(
    num_docs: int,
    n_new: int,
    history: Sequence[HistoryEntry],
    rng: random.Random,
    *,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    doc_tokens: Sequence[int] | None = None,
) -> list[int]:
    """Sorted document indices of one questioner prompt (module docstring).

    `num_docs` is the row's document count; `history` its remembered entries (possibly empty);
    `max_docs` / `max_tokens` are the explicit schedule's caps (None: uncapped).
    """
    if num_docs < 1:
        raise ValueError("select_documents needs a row with at least one document")
    evidence = [i for i in evidence_union(history) if 0 <= i < num_docs]
    used = set(evidence)
    unused = [i for i in range(num_docs) if i not in used]
    new = rng.sample(unused, min(n_new, len(unused)))
    if max_docs is None and max_tokens is None:
        return sorted(evidence + new)
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"curriculum max_docs={max_docs} must be >= 1")
    return _cap(evidence, new, rng, max_docs, max_tokens, doc_tokens)


@dataclass(frozen=True, kw_only=True)
class CurriculumSchedule:
    """Optional explicit caps per stage: `docs_per_stage[k]` documents and/or `tokens_per_stage[k]` tokens
    at stage k = min(step // steps_per_stage, last). Empty tuples mean no cap of that kind."""

    docs_per_stage: tuple[int, ...] = ()
    tokens_per_stage: tuple[int, ...] = ()
    steps_per_stage: int = 0

    def __post_init__(self) -> None:
        if (self.docs_per_stage or self.tokens_per_stage) and self.steps_per_stage < 1:
            raise ValueError(
                "data.curriculum_steps_per_stage must be >= 1 when a curriculum schedule is given"
            )
        both = self.docs_per_stage and self.tokens_per_stage
        if both and len(self.docs_per_stage) != len(self.tokens_per_stage):
            raise ValueError("curriculum: docs_per_stage and tokens_per_stage need equal lengths")
        if any(v < 1 for v in self.docs_per_stage + self.tokens_per_stage):
            raise ValueError("curriculum: every per-stage cap must be >= 1")

    @property
    def enabled(self) -> bool:
        return bool(self.docs_per_stage or self.tokens_per_stage)

    def stage(self, step: int) -> int:
        if not self.enabled:
            return 0
        last = max(len(self.docs_per_stage), len(self.tokens_per_stage)) - 1
        return min(max(step, 0) // self.steps_per_stage, last)

    def limits(self, step: int) -> tuple[int | None, int | None]:
        """(max_docs, max_tokens) at `step`; None where uncapped."""
        if not self.enabled:
            return None, None
        k = self.stage(step)
        docs = self.docs_per_stage[k] if self.docs_per_stage else None
        tokens = self.tokens_per_stage[k] if self.tokens_per_stage else None
        return docs, tokens
