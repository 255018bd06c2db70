"""Verifier votes, majority, per-judgement reward and training-candidate selection
(docs/spell-algorithm.md §3.2 and §3.4).

Votes: 1 = the answers are equivalent ([[YES]]), 0 = not equivalent ([[NO]]), -1 = invalid;
`NOT_JUDGED` (-100) marks a responder trajectory that had no parsable prediction or reference.

Deliberate decisions (§9):

* D3, vote parsing. The reference tests case-sensitive substrings, so any capitalised word
  containing "NO" ("NOT", "NONE", "NOTE") flips or invalidates a YES. We read the decision
  word-aware: the LAST bracketed decision token `[[YES]]` / `[[NO]]` (case-insensitive, spaces
  inside the brackets allowed) is the vote, because the prompt asks for the decision at the end.
  Without a bracketed token we fall back to whole upper-case words `YES` / `NO` (word boundaries, so
  NOT/NONE/NOTE/YESTERDAY do not count): exactly one kind present gives that vote, both or none give
  -1. An unclosed `<think>` gives -1.
* D3, ties. The majority is the mode over {1, 0, -1}. The reference breaks a tie for the top
  count by the first value seen (`Counter.most_common`), which depends on the order the judgements
  were sampled in. We break it independently of order: a tie between YES and NO is -1 ("no
  majority"), so a split verifier never upgrades a reward (Eq. 6); such a group has an agreement of
  exactly 0.5 over its valid votes and fails the 0.51 training bound anyway. A tie between one valid
  value and the invalid votes goes to the valid value (invalid votes are no opinion): `[1, 1, 1, -1,
  -1, -1, 0, 0]` has majority 1 with agreement 3/5 = 0.6, a verifier training candidate when the
  rule score is 1 and an upgrade when it is 0, which is what the reference gives when a YES comes
  first.
* §9 item 4: `label_type="maj_cons"` (default, reference) keeps only groups whose majority equals
  the rule score; `label_type="maj"` drops that condition.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

YES, NO, INVALID, NOT_JUDGED = 1, 0, -1, -100
LABEL_TYPES = ("maj_cons", "maj")

_BRACKET_RE = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)
_YES_WORD_RE = re.compile(r"\bYES\b")
_NO_WORD_RE = re.compile(r"\bNO\b")


def parse_vote(text: str) -> int:
    """The vote of one judgement text: 1, 0 or -1 (module docstring); never raises."""
    if not isinstance(text, str):
        return INVALID
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return INVALID
    decisions = _BRACKET_RE.findall(text)
    if decisions:
        return YES if decisions[-1].upper() == "YES" else NO
    has_yes, has_no = bool(_YES_WORD_RE.search(text)), bool(_NO_WORD_RE.search(text))
    if has_yes and not has_no:
        return YES
    if has_no and not has_yes:
        return NO
    return INVALID


def majority(votes: Sequence[int]) -> int:
    """Mode of the votes over {1, 0, -1}; ties as in the module docstring; no votes give -1."""
    counts = Counter(v for v in votes if v in (YES, NO, INVALID))
    if not counts:
        return INVALID
    top = max(counts.values())
    tied = {v for v, c in counts.items() if c == top} - {INVALID}
    return tied.pop() if len(tied) == 1 else INVALID


def judgement_rewards(votes: Sequence[int], majority_vote: int) -> list[float]:
    """Per-judgement verifier reward: -1 for an invalid vote, 1 if it equals the majority, else 0."""
    return [-1.0 if v == INVALID else (1.0 if v == majority_vote else 0.0) for v in votes]


def agreement_ratio(votes: Sequence[int], majority_vote: int) -> float:
    """Fraction of valid votes that agree with a valid majority; 0.0 without a valid majority or votes."""
    valid = [v for v in votes if v in (YES, NO)]
    if majority_vote not in (YES, NO) or not valid:
        return 0.0
    mean = sum(valid) / len(valid)
    return mean if majority_vote == YES else 1.0 - mean


def is_training_candidate(
    votes: Sequence[int],
    rule_score: float,
    *,
    label_type: str = "maj_cons",
    lower_bound: float = 0.51,
    upper_bound: float = 0.99,
) -> bool:
    """Whether a verifier group is kept as training data (docs/spell-algorithm.md §3.4): valid
    majority, agreement within [lower_bound, upper_bound], and with maj_cons the majority equal to
    the rule score."""
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type={label_type!r}: expected one of {LABEL_TYPES}")
    if not 0.0 <= lower_bound <= upper_bound <= 1.0:
        raise ValueError(
            f"verifier bounds [{lower_bound}, {upper_bound}]: need 0 <= lower_bound <= upper_bound <= 1"
        )
    m = majority(votes)
    if m == INVALID:
        return False
    if not lower_bound <= agreement_ratio(votes, m) <= upper_bound:
        return False
    return label_type == "maj" or float(m) == float(rule_score)
