"""tools/learning_report.py: the trend statistics against hand-computed values, the answer-format share
from the rollout dumps, and the report from a run directory and two eval directories."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lr():
    spec = importlib.util.spec_from_file_location("lr", ROOT / "tools/learning_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trend_hand_computed(lr):
    # y = 0.1 + 0.01 x exactly: slope 0.1 per 10 steps, no residual
    t = lr.trend([(x, 0.1 + 0.01 * x) for x in range(1, 7)])
    assert t["slope"] == pytest.approx(0.1) and t["slope_se"] == pytest.approx(0.0, abs=1e-12)
    assert t["first"] == pytest.approx((0.11 + 0.12) / 2) and t["last"] == pytest.approx(0.155)
    # (1, 0), (2, 1), (3, 0): slope 0, residuals -1/3, 2/3, -1/3: SE = sqrt((2/3) / 1 / 2)
    t = lr.trend([(1, 0.0), (2, 1.0), (3, 0.0)])
    assert t["slope"] == pytest.approx(0.0, abs=1e-12)
    assert t["slope_se"] == pytest.approx(10 * math.sqrt((2 / 3) / 2))
    assert t["spread"] == pytest.approx(math.sqrt(1 / 3))


def _write_eval(path: Path, per_q: dict[str, list[float]], texts: list[str]) -> None:
    path.mkdir()
    rows = [
        {"id": q, "task": "doc_general_qa", "predictions": texts, "scores": s}
        for q, s in per_q.items()
    ]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    micro = {"name": "overall (micro)", "num_examples": len(rows), "mean_at_n": 0.25}
    micro |= {"pass_at_k": {"1": 0.25, "2": 0.5}, "mean_at_n_se": 0.1, "pass_at_k_se": {"2": 0.2}}
    (path / "metrics.json").write_text(json.dumps({"groups": [micro]}))


def test_report_from_dumps_and_evals(lr, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    steps = [{"step": s, "responder/reward_mean": 0.1 * s, "questioner/bad_format_frac": 0.5}
             for s in (1, 2, 3)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    for i, texts in enumerate([["The answer is x", "no"], ["The answer is y", "The answer is z"]]):
        group = {"task": "doc_general_qa", "responses": texts}
        (run / "rollouts" / f"step_{i:08d}_rounds.jsonl").write_text(json.dumps(group) + "\n")
    curves = lr.step_curves(run)
    assert curves["responder/answer_format_frac"] == [(1, 0.5), (2, 1.0)]
    assert curves["questioner/valid_format_frac"] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    _write_eval(tmp_path / "base", {"a": [0.0, 0.0], "b": [1.0, 0.0]}, ["x", "The answer is y"])
    _write_eval(tmp_path / "after", {"a": [1.0, 0.0], "b": [1.0, 1.0]}, ["The answer is y"] * 2)
    png = tmp_path / "fig.png"
    argv = [
        "--run",
        str(run),
        "--before",
        str(tmp_path / "base"),
        "--after",
        str(tmp_path / "after"),
    ]
    assert lr.main([*argv, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| base | 2 | 25.00 ± 10.00 | 50.00 ± 20.00 | 25.00 | 50.0% |" in out
    assert "| trained | 2 | 25.00 ± 10.00 | 50.00 ± 20.00 | 25.00 | 100.0% |" in out
    # per-question mean@2 differences 0.5 and 0.5: +50 points, SE 0
    assert "over 2 questions: +50.00 ± 0.00 points" in out
    assert png.stat().st_size > 10_000
