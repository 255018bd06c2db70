"""Report files agree with the per-example JSONL; CLI flag validation happens before any engine starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megatron_spell.eval.cli import _parse_ks, add_eval_arguments, run_eval
from megatron_spell.eval.report import (
    METRICS,
    PLOT,
    PREDICTIONS,
    TABLE,
    parse_markdown_table,
    read_predictions,
    write_report,
)
from tests.unit.eval.recompute import assert_table_matches


def _rows() -> list[dict]:
    return [
        {"id": "1", "benchmark": "hotpotqa", "scores": [1.0, 0.0, 0.0, 0.0]},
        {"id": "2", "benchmark": "hotpotqa", "scores": [1.0, 1.0, 0.0, 1.0]},
        {"id": "3", "benchmark": "docmath", "scores": [0.0, 0.0, 0.0, 0.0]},
        {"id": "4", "benchmark": "longbench-v2", "scores": [0.0, 1.0, 0.0, 1.0]},
        {"id": "5", "benchmark": "docmath", "scores": [0.0, 0.0, 1.0, 0.0]},
    ]


def test_report_table_agrees_with_jsonl(tmp_path: Path) -> None:
    groups = write_report(_rows(), tmp_path, (1, 2, 4), {"note": "unit"})
    for name in (PREDICTIONS, METRICS, TABLE, PLOT):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    assert (tmp_path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_predictions(tmp_path / PREDICTIONS) == _rows()
    table_md = (tmp_path / TABLE).read_text()
    assert_table_matches(table_md, tmp_path / PREDICTIONS, [1, 2, 4], n=4)
    # hand check of one cell: hotpotqa pass@2 = mean(1 - C(3,2)/C(4,2), 1) = mean(0.5, 1) = 75 %
    assert parse_markdown_table(table_md)["hotpotqa"]["pass@2"] == "75.00"
    metrics = json.loads((tmp_path / METRICS).read_text())
    assert [g["name"] for g in metrics["groups"]] == [g.name for g in groups]
    assert metrics["settings"] == {"note": "unit"}


def test_recompute_detects_a_wrong_table(tmp_path: Path) -> None:
    write_report(_rows(), tmp_path, (1, 2, 4), {})
    bad = (tmp_path / TABLE).read_text().replace("75.00", "74.00")
    with pytest.raises(AssertionError):
        assert_table_matches(bad, tmp_path / PREDICTIONS, [1, 2, 4], n=4)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_follow_the_protocol(tmp_path: Path) -> None:
    args = _parse(["--model", "m", "--data", "a", "--data", "b", "--out", "o"])
    assert args.data == ["a", "b"] and args.n == 8 and args.max_input_tokens == 16384
    assert args.temperature == 0.7 and args.top_p == 0.95 and args.judge == "none"
    assert _parse_ks(None, 8) == (1, 2, 4, 8)
    assert _parse_ks("4,1,2", 8) == (1, 2, 4)
    for bad in ("0,1", "16", "a"):
        with pytest.raises(ValueError, match="--ks"):
            _parse_ks(bad, 8)


def test_user_errors_raise_before_the_engine(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"foo": 1}) + "\n")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="no config.json"):
        run_eval(_parse(["--model", str(model), "--data", str(data), "--out", out]))
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown evaluation format"):
        run_eval(_parse(["--model", str(model), "--data", str(data), "--out", out]))
    with pytest.raises(ValueError, match="--judge openai needs"):
        run_eval(
            _parse(["--model", str(model), "--data", str(data), "--out", out, "--judge", "openai"])
        )
    with pytest.raises(ValueError, match="--n"):
        run_eval(_parse(["--model", str(model), "--data", str(data), "--out", out, "--n", "0"]))
