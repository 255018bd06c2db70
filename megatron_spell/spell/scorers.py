"""Rule-based scorers for the three SPELL tasks (spec section 3.1), with a safe numeric parser.

Public entry point: `score(task, prediction, reference) -> float`, where `prediction` is the model's full
response text and `reference` the bare reference answer (a reference wrapped as "The correct answer is X" is
accepted too). `parse_prediction` returns the parsed prediction string that the verifier is shown.

* doc_general_qa (3.1.1): answer after the last "the answer is" / "correct answer is" / "answer is", first line,
  SQuAD-style normalisation; metrics em, sub_em_strict (default, as the reference scripts), sub_em_loose,
  half_em, f1.
* doc_mc (3.1.2): one letter A-D after "answer is" or in `\\boxed{}`; exact match.
* docmath_qa (3.1.3): number after "answer is" or in the last balanced `\\boxed{}`; both sides normalised by
  `parse_number`; `compare_two_numbers` with the reference's 0.15 % tolerance and x100/x1000/x1e6/x1e9 scale rule.

Deliberate deviations (spec section 9 item 6):

* No `eval`. `parse_number` re-implements the normalise steps that matter for numbers (currency and scale words
  removed, text after the last `=`/`≈`, `%`, `$`, backticks and degree signs removed, "approximately" and
  " or ..." dropped, one unit word or 1-2 symbols around the number stripped, `a x 10^k`, `10^k`, `a/b`,
  parentheses, thousands commas) and evaluates the result with a whitelist-of-characters arithmetic walker over
  `ast` (numbers, unary +/-, + - * / **; bounded length and exponent). Model text is never executed.
* Sign: the reference's rounding branch compares absolute values, so -5 matches 5 (and its scale branch lets
  -5 match 500). We require the signs to agree (a zero on either side is sign-neutral); all other rules are
  kept. A changed sign is a wrong answer for every docmath quantity (loss vs profit, decrease vs increase).
* Booleans and option letters normalise to "not a number" (None) and therefore score 0, as the reference's
  scorer effectively does; the questioner parser drops such ground truths (see parsing.py).
"""

from __future__ import annotations

import ast
import math
import re
import string
from collections import Counter
from collections.abc import Callable

from megatron_spell.types import Task

QA_METRICS = ("em", "sub_em_strict", "sub_em_loose", "half_em", "f1")
DEFAULT_QA_METRIC = "sub_em_strict"
MAX_NUMBER_CHARS = 120  # longer candidate strings are not numbers we try to evaluate
_MAX_EXPONENT = 400

_DEEPSEEK_MARKERS = ("<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>")
_GENERAL_PHRASES = ("the answer is", "correct answer is", "answer is")
_LETTER = r"\(?([A-Za-z])\)?"
_MC_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\\boxed\{\s*" + _LETTER + r"\s*\}",
        r"correct answer is\s*:?\s*\(([A-Za-z])\)",
        r"correct answer is\s*:?\s*([A-Za-z])\b",
        r"answer is\s*:?\s*\(([A-Za-z])\)",
        r"answer is\s*:?\s*([A-Za-z])\b",
    )
)
_NUM = r"([=≈`%$°£€¥\\]*\s*-?[0-9.,]+)"
_DOCMATH_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"the answer is\s*:?\s*\(" + _NUM + r"\)",
        r"the answer is\s*:?\s*" + _NUM,
        r"answer is\s*:?\s*\(" + _NUM + r"\)",
        r"answer is\s*:?\s*" + _NUM,
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


def _as_task(task: Task | str) -> Task:
    try:
        return Task(task)
    except ValueError:
        return scorer_task(str(task))


def scorer_task(data_source: str) -> Task:
    """The scorer a data-source name dispatches to (reward_score/__init__.py:83-93).

    Names with doc_mc / longbench_v2 / longbench-v2 -> doc_mc; general_qa / frames / musique / longbench ->
    doc_general_qa; docmath -> docmath_qa. Raises ValueError for a name that matches none.
    """
    name = data_source.lower()
    if "doc_mc" in name or "longbench_v2" in name or "longbench-v2" in name:
        return Task.DOC_MC
    if any(k in name for k in ("general_qa", "frames", "musique", "longbench", "hotpot", "2wiki")):
        return Task.DOC_GENERAL_QA
    if "docmath" in name:
        return Task.DOCMATH_QA
    raise ValueError(
        f"no scorer for data source {data_source!r}: expected a doc_mc/qa/docmath name"
    )


def extract_solution(text: str, fallback_chars: int, *, boxed_trigger: bool = False) -> str:
    """The part of a response that may hold the answer (docqa 204-226, long 50-74, docmath 159-183)."""
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
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace (docqa 105-120)."""
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
    """Letter A-D of an MC response: the first pattern that matches anywhere, its last match (long 76-114)."""
    text = text.replace("*", "")
    for pattern in _MC_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            letter = matches[-1]
            return letter if letter in ("A", "B", "C", "D") else None
    return None


def _last_boxed(text: str) -> str | None:
    start = len(text)
    for _ in range(5):  # bounded: look at the last few \boxed{ only
        start = text.rfind("\\boxed{", 0, start)
        if start < 0:
            return None
        depth, begin = 0, start + len("\\boxed{")
        for i in range(begin - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[begin:i]
    return None


def parse_docmath_answer(text: str) -> str | None:
    """Number string of a docmath response: last balanced `\\boxed{}` or an "answer is N" phrase."""
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


def format_number(value: float) -> str:
    """Canonical text of a parsed number: integers without a decimal point, others as Python's repr."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def compare_two_numbers(prediction: float, reference: float) -> bool:
    """Reference tolerance and scale rules (docmath 233-256), with signs required to agree (module doc)."""
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
    """The parsed answer string of a full response (what the verifier sees as Answer 1), or None."""
    if not isinstance(prediction, str):
        return None
    task = _as_task(task)
    if task is Task.DOC_GENERAL_QA:
        return parse_general_answer(extract_solution(prediction, 1000))
    if task is Task.DOC_MC:
        return parse_mc_answer(extract_solution(prediction, 300))
    return parse_docmath_answer(extract_solution(prediction, 300, boxed_trigger=True))


def parse_reference(task: Task | str, reference: str) -> str | None:
    """The bare reference answer; a reference phrased "The correct answer is X" is unwrapped."""
    if not isinstance(reference, str):
        return None
    task = _as_task(task)
    wrapped = "answer is" in reference or "\\boxed{" in reference
    if task is Task.DOC_GENERAL_QA:
        return parse_general_answer(reference) if wrapped else reference.strip()
    if task is Task.DOC_MC:
        bare = reference.strip().strip("().")
        return bare if bare in ("A", "B", "C", "D") else parse_mc_answer(reference)
    return parse_docmath_answer(reference) if wrapped else reference.strip()


def _score_general(pred: str, ref: str, metric: str) -> float:
    return qa_metrics(pred, ref)[metric]


def _score_mc(pred: str, ref: str, metric: str) -> float:
    return float(pred == ref)


def _score_docmath(pred: str, ref: str, metric: str) -> float:
    p, g = parse_number(pred), parse_number(ref)
    if p is None or g is None:
        return 0.0
    return float(compare_two_numbers(p, g))


_SCORERS: dict[Task, Callable[[str, str, str], float]] = {
    Task.DOC_GENERAL_QA: _score_general,
    Task.DOC_MC: _score_mc,
    Task.DOCMATH_QA: _score_docmath,
}


def score(
    task: Task | str, prediction: str, reference: str, *, qa_metric: str = DEFAULT_QA_METRIC
) -> float:
    """Rule score in [0, 1] of a full response against a bare reference answer; never raises on text.

    `task` is a Task (or a data-source name, see `scorer_task`); `qa_metric` picks the doc_general_qa metric.
    """
    if qa_metric not in QA_METRICS:
        raise ValueError(f"qa_metric={qa_metric!r} is not one of {QA_METRICS}")
    task = _as_task(task)
    pred, ref = parse_prediction(task, prediction), parse_reference(task, reference)
    if pred is None or ref is None:
        return 0.0
    return _SCORERS[task](pred, ref, qa_metric)
