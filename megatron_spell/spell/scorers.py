"""Rule-based scorers for the SPELL tasks (docs/spell-algorithm.md §3.1), with a safe numeric
parser.

Public entry point: `score(task, prediction, reference) -> float`, where `prediction` is the model's
full response text and `reference` the bare reference answer (a reference wrapped as "The correct
answer is X" is accepted too). `parse_prediction` returns the parsed prediction string that the
verifier is shown. Both look the task up in the task registry (`spell/tasks/`); this module holds
the answer-parsing primitives the task records are built from:

* doc_general_qa (3.1.1): answer after the last "the answer is" / "correct answer is" / "answer is",
  first line, SQuAD-style normalisation; metrics em, sub_em_strict (default, as the reference
  scripts), sub_em_loose, half_em, f1.
* doc_mc (3.1.2): one letter A-D after "answer is" or in `\\boxed{}`; exact match. The patterns are
  the reference's (`SPELL/verl/verl/utils/reward_score/long.py:97-103`): exactly one space after
  "is", no colon, case-insensitive, the first pattern that matches anywhere gives its last match,
  and that letter must be upper-case. So "The correct answer is: B" and "The correct answer is\nB"
  give None, as in the reference.
* docmath_qa (3.1.3): the content of the LAST `\\boxed{}` when one is present (None when that box is
  not closed; an earlier box is never used), else the reference's "answer is N" patterns
  (`SPELL/verl/verl/utils/reward_score/docmath.py:213-216`): one space after "is", then the optional
  prefix symbols `= ≈ \\` % $ ° £ € ¥` at most once each in that order, an optional `-` and
  `[0-9.,]+`. Both sides are normalised by `parse_number` and compared by `compare_two_numbers` with
  the reference's 0.15 % tolerance and x100/x1000/x1e6/x1e9 scale rule.

Deliberate deviations (D4, and one in the doc_mc patterns):

* doc_mc: a bare letter must end a word (`\\b`). The reference reads the first letter of any word
  after "answer is", so "The correct answer is Based on ..." or "... is Both" score as B; we give
  None there (a letter the response never chose is not an answer). Everything else of the
  reference's patterns is kept.

* No `eval`. `parse_number` re-implements the normalise steps that matter for numbers (currency and
  scale words removed, text after the last `=`/`≈`, `%`, `$`, backticks and degree signs removed,
  "approximately" and " or ..." dropped, one unit word or 1-2 symbols around the number stripped,
  `a x 10^k`, `10^k`, `a/b`, parentheses, thousands commas) and evaluates the result with a
  whitelist-of-characters arithmetic walker over `ast` (numbers, unary +/-, + - * / **; bounded
  length and exponent). Model text is never executed.
* Sign: the reference's rounding branch compares absolute values, so -5 matches 5 (and its scale
  branch lets -5 match 500). We require the signs to agree (a zero on either side is sign-neutral);
  all other rules are kept. A changed sign is a wrong answer for every docmath quantity (loss vs
  profit, decrease vs increase). For the same reason a unicode minus (U+2212) before a docmath
  answer counts as `-`; the reference's pattern does not match it, so "the answer is \u22125" scores
  0 there.
* Booleans and option letters normalise to "not a number" (None) and therefore score 0, as the
  reference's scorer effectively does; the questioner parser drops such ground truths (see
  tasks/docmath.py).
"""

from __future__ import annotations

import ast
import math
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from megatron_spell.spell import tasks
from megatron_spell.types import Task

QA_METRICS = ("em", "sub_em_strict", "sub_em_loose", "half_em", "f1")
DEFAULT_QA_METRIC = "sub_em_strict"
MAX_NUMBER_CHARS = 120  # longer candidate strings are not numbers we try to evaluate
_MAX_EXPONENT = 400

_DEEPSEEK_MARKERS = ("<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>")
_GENERAL_PHRASES = ("the answer is", "correct answer is", "answer is")
MC_LETTERS = ("A", "B", "C", "D")
# the reference's patterns, in its order (module docstring)
_MC_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\\boxed\{([A-D])\}",
        r"correct answer is \(([A-D])\)",
        r"correct answer is ([A-D])\b",
        r"answer is \(([A-D])\)",
        r"answer is ([A-D])\b",
    )
)
_NUM = r"(=?≈?`?%?\$?°?£?€?¥?-?[0-9.,]+)"
_DOCMATH_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"the answer is \(" + _NUM + r"\)",
        r"the answer is " + _NUM,
        r"answer is \(" + _NUM + r"\)",
        r"answer is " + _NUM,
    )
)
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_SCALE_WORDS_RE = re.compile(r"\b(million|billion|thousand)s?\b", re.IGNORECASE)
_CURRENCY_RE = re.compile(r"USD|US|RMB|[£€¥]")
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])")
_LEADING_UNIT_RE = re.compile(r"^\s*(?:[A-Za-z]+\.?|[^\w\s().+\-]{1,2})\s*")
_TRAILING_UNIT_RE = re.compile(r"\s*(?:[A-Za-z]+\.?|[^\w\s().]{1,2})\s*$")
_ARITH_CHARS_RE = re.compile(r"^[0-9eE.+\-*/() ]+$")


def scorer_task(data_source: str) -> Task | str:
    """The task a data-source name dispatches to (docs/spell-algorithm.md §3.1; the routing rule is
    in spell/tasks/).

    Names with doc_mc / longbench_v2 / longbench-v2 -> doc_mc; general_qa / frames / musique / longbench /
    hotpot / 2wiki -> doc_general_qa; docmath -> docmath_qa. Raises ValueError for a name that matches none.
    """
    return tasks.for_data_source(data_source).task


def extract_solution(text: str, fallback_chars: int, *, boxed_trigger: bool = False) -> str:
    """The part of a response that may hold the answer
    (`SPELL/verl/verl/utils/reward_score/docqa.py:204-226`,
    `SPELL/verl/verl/utils/reward_score/long.py:50-74`,
    `SPELL/verl/verl/utils/reward_score/docmath.py:159-183`)."""
    if "<think>" in text and "</think>" not in text:
        return "Empty"
    if "</think>" in text or "answer is" in text or (boxed_trigger and "\\boxed{" in text):
        return text.rsplit("</think>", 1)[-1]
    return text[-fallback_chars:]


def parse_general_answer(text: str) -> str | None:
    """Answer phrase of a general-QA response: text after the last answer phrase, first line only."""
    text = text.replace("*", "")
    for marker in _DEEPSEEK_MARKERS:
        text = text.replace(marker, "")
    for phrase in _GENERAL_PHRASES:
        if phrase in text:
            candidate = text.rsplit(phrase, 1)[1].strip(" .\n\r\t")
            candidate = candidate.split("\n", 1)[0].strip(" .")
            return None if "insert answer here" in candidate else candidate
    return None


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace
    (`SPELL/verl/verl/utils/reward_score/docqa.py:105-120`)."""
    text = text.lower().translate(_PUNCT_TABLE)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def qa_metrics(prediction: str, reference: str) -> dict[str, float]:
    """em, sub_em_strict, sub_em_loose, half_em and f1 of normalised strings, rounded to 2 decimals."""
    p, g = normalize_answer(prediction), normalize_answer(reference)
    em = float(bool(p) and p == g)
    strict = float(bool(p) and bool(g) and g in p)
    loose = float(bool(p) and bool(g) and (g in p or p in g))
    half = 1.0 if em else (0.5 if loose else 0.0)
    return {
        "em": em,
        "sub_em_strict": strict,
        "sub_em_loose": loose,
        "half_em": half,
        "f1": round(_f1(p, g), 2),
    }


def _f1(p: str, g: str) -> float:
    if not p or not g:
        return 0.0
    special = {"yes", "no", "noanswer"}
    if (p in special or g in special) and p != g:
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    common = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_tokens), common / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def parse_mc_answer(text: str) -> str | None:
    """Letter A-D of an MC response: the first pattern that matches anywhere, its last match
    (`SPELL/verl/verl/utils/reward_score/long.py:76-114`)."""
    if not isinstance(text, str):
        return None
    text = text.replace("*", "")
    for pattern in _MC_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            letter = matches[-1]
            return letter if letter in MC_LETTERS else None
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`; None when that box is never closed
    (`SPELL/verl/verl/utils/reward_score/docmath.py:8-35`)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def parse_docmath_answer(text: str) -> str | None:
    """Number string of a docmath response: the last `\\boxed{}` (if closed) or an "answer is N" phrase."""
    if not isinstance(text, str):
        return None
    text = text.replace("*", "").replace("\u2212", "-")
    if "\\boxed{" in text:
        boxed = _last_boxed(text)
        return None if boxed is None else boxed.replace(",", "").strip().rstrip(".")
    for pattern in _DOCMATH_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1].replace(",", "").strip().rstrip(".")
    return None


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            return left / right
        if isinstance(node.op, ast.Pow) and abs(right) <= _MAX_EXPONENT and abs(left) < 1e6:
            return left**right
    raise ValueError("not a plain arithmetic expression")


def _safe_arith(expr: str) -> float | None:
    expr = expr.strip()
    if not expr or len(expr) > MAX_NUMBER_CHARS or not _ARITH_CHARS_RE.match(expr):
        return None
    try:
        value = _eval_node(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, TypeError):
        return None
    if isinstance(value, complex) or not math.isfinite(value):
        return None
    return float(value)


def _clean_number_text(text: str) -> str | None:
    s = text.strip().rstrip(".").strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-")  # unicode minus / en dash: keep the sign
    s = _SCALE_WORDS_RE.sub("", _CURRENCY_RE.sub("", s))
    s = re.split(r"[=≈]", s)[-1]
    for ch in "`%$°":
        s = s.replace(ch, "")
    s = re.sub(r"approximately", "", s, flags=re.IGNORECASE)
    s = s.split(" or ", 1)[0].strip()
    if s.lower() in ("true", "false", "yes", "no") or "True" in s or "False" in s:
        return None  # booleans are not numbers (reference maps them to bool literals)
    if re.fullmatch(r"\(?[a-dA-D]\)", s):
        return None  # an option such as (a) is not a number
    s = re.sub(r"(\d)\s*(?:x|×|\*)\s*(?=\d)", r"\1*", s)
    s = s.replace("^", "**")
    return _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s).strip()


def parse_number(text: str) -> float | None:
    """A finite float for a numeric answer string, or None; never evaluates code (see module docstring)."""
    if not isinstance(text, str) or len(text) > 4 * MAX_NUMBER_CHARS:
        return None
    s = _clean_number_text(text)
    if not s:
        return None
    lead_stripped = _LEADING_UNIT_RE.sub("", s, count=1)
    for candidate in (s, lead_stripped, _TRAILING_UNIT_RE.sub("", s, count=1)):
        value = _safe_arith(candidate)
        if value is not None:
            return value
    return _safe_arith(_TRAILING_UNIT_RE.sub("", lead_stripped, count=1))


def format_number(value: Any) -> str:
    """Canonical text of a number: integers without a decimal point, other floats as Python's repr.

    Used for parsed questioner answers and for datasets' numeric gold answers; a bool stays "True"/"False"
    and any other value is its stripped text.
    """
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value).strip()


def compare_two_numbers(prediction: float, reference: float) -> bool:
    """Reference tolerance and scale rules
    (`SPELL/verl/verl/utils/reward_score/docmath.py:233-256`), with signs required to agree (module
    doc)."""
    p, g = float(prediction), float(reference)
    if not (math.isfinite(p) and math.isfinite(g)):
        return False
    if p * g < 0:
        return False
    v1, v2 = max(abs(g), abs(p)), min(abs(g), abs(p))
    for scale in (100, 1000, 1e6, 1e9):
        if v2 <= 2 * v1 / scale and abs(v2 * scale - v1) <= 0.0015 * v1:
            return True
    if math.ceil(1000 * v1) / 1000 == math.ceil(1000 * v2) / 1000:
        return True
    return abs(p - g) <= 0.0015 * abs(g)


def parse_prediction(task: Task | str, prediction: str) -> str | None:
    """The parsed answer string of a full response (what the verifier sees as Answer 1), or None.

    `task` is a registered task or a data-source name (`scorer_task`).
    """
    if not isinstance(prediction, str):
        return None
    return tasks.resolve(task).parse_prediction(prediction)


def parse_reference(task: Task | str, reference: str) -> str | None:
    """The bare reference answer; a reference phrased "The correct answer is X" is unwrapped."""
    if not isinstance(reference, str):
        return None
    return tasks.resolve(task).parse_reference(reference)


def is_wrapped(reference: str) -> bool:
    """Whether a reference is phrased as an answer sentence ("... answer is X" or `\\boxed{X}`)."""
    return "answer is" in reference or "\\boxed{" in reference


def unwrap_reference(reference: str, parse: Callable[[str], str | None]) -> str | None:
    """`parse` of a wrapped reference (`is_wrapped`), else the reference stripped."""
    return parse(reference) if is_wrapped(reference) else reference.strip()


def score(
    task: Task | str, prediction: str, reference: str, *, qa_metric: str = DEFAULT_QA_METRIC
) -> float:
    """Rule score in [0, 1] of a full response against a bare reference answer; never raises on text.

    `task` is a registered task (or a data-source name, see `scorer_task`); `qa_metric` picks the
    doc_general_qa metric.
    """
    if qa_metric not in QA_METRICS:
        raise ValueError(f"qa_metric={qa_metric!r} is not one of {QA_METRICS}")
    spec = tasks.resolve(task)
    pred, ref = parse_prediction(spec.task, prediction), parse_reference(spec.task, reference)
    if pred is None or ref is None:
        return 0.0
    return spec.score(pred, ref, qa_metric)
