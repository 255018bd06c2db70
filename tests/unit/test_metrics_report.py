"""MetricsLogger sinks (JSONL, TensorBoard event files) and the report PNG/markdown."""

import math

import pytest

from megatron_spell.metrics import MetricsLogger, read_jsonl
from megatron_spell.report import write_report
from tests.helpers.clock import FakeClock


def test_logger_writes_jsonl_tensorboard_and_report(tmp_path, monkeypatch):
    import megatron_spell.metrics

    # a timer span is 0.25 s
    monkeypatch.setattr(megatron_spell.metrics, "time", FakeClock(start=100.0, step=0.25))
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.add({"loss": 1.0 / step, "grad_norm": 0.5}, prefix="train")
        logger.add({"responder/reward_mean": 0.1 * step, "questioner/bad_format_frac": 0.2})
        with logger.timer("generate"):
            pass
        with logger.timer("generate"):
            pass
        out = logger.flush(step)
        assert out["train/loss"] == pytest.approx(1.0 / step)
        assert out["timing/generate_s"] == 0.5  # two spans accumulate within a step
    logger.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["responder/reward_mean"] == pytest.approx(0.3)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    msg = write_report(tmp_path)
    assert "report.png" in msg
    assert (tmp_path / "report.png").stat().st_size > 10_000
    md = (tmp_path / "report.md").read_text()
    assert "| train/loss | 1 | 0.3333 |" in md


def test_disabled_logger_keeps_timers_and_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "x", enabled=False)
    with logger.timer("train"):
        pass
    logger.add({"a/b": math.nan})
    out = logger.flush(1)
    assert "timing/train_s" in out and math.isnan(out["a/b"])
    assert not (tmp_path / "x").exists()


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        write_report(tmp_path)


def test_report_time_breakdown_and_orchestration_overhead(tmp_path):
    """Means over steps; a phase missing from a step counts 0 s there; overhead = step - generate - train."""
    import json

    rows = [
        {"step": 1, "timing/step_s": 100.0, "timing/generate_s": 60.0, "timing/train_s": 30.0,
         "timing/generate_questioner_s": 40.0, "timing/generate_responder_s": 20.0,
         "timing/sync_s": 4.0, "timing/score_s": 1.0},
        {"step": 2, "timing/step_s": 200.0, "timing/generate_s": 100.0, "timing/train_s": 80.0,
         "timing/generate_questioner_s": 50.0, "timing/generate_responder_s": 50.0,
         "timing/sync_s": 6.0, "timing/score_s": 1.0, "timing/checkpoint_s": 10.0,
         "train/num_model_tokens": 900.0, "train/num_trajectory_tokens": 2700.0,
         "train/shared_prefix_units": 3.0},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| generate | 80.00 | 53.3% |" in md
    assert "| - questioner | 45.00 | 30.0% |" in md
    assert "| checkpoint | 5.00 | 3.3% |" in md
    assert "| other (batching, dumps, metrics) | 4.00 | 2.7% |" in md  # 150 - 80 - 1 - 55 - 5 - 5
    assert "| **step** | 150.00 | 100% |" in md
    assert "everything but generation and training): 10.00% of the step" in md  # (150-80-55)/150
    # the update's tokens through the model, over the steps that report them
    assert (
        "Update: 900 tokens through the model per step for 2700 trajectory tokens (3.00x fewer) "
        "(train.shared_prefix units 3.0"
    ) in md


def test_report_labels_every_curve_by_role_and_shows_peak_memory_and_dtype(tmp_path):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from megatron_spell.report import plot

    rows = [
        {"step": s, "responder/reward_mean": 0.1 * s, "questioner/reward_mean": 0.2,
         "verifier/reward_mean": 0.3, "timing/train_s": 5.0, "timing/step_s": 9.0,
         "memory/peak_rss_gb/generate": 3.0 + s, "memory/peak_rss_gb/train": 7.5 - s}
        for s in (1, 2)
    ]  # fmt: skip
    fig = plot(rows, "t")
    legends = {ax.get_title(): ax.get_legend_handles_labels()[1] for ax in fig.axes if ax.lines}
    assert legends["Reward by role"] == ["responder", "questioner", "verifier"]
    assert legends["Peak resident memory (GB, process tree)"] == ["generate", "update"]
    for labels in legends.values():
        assert len(set(labels)) == len(labels)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text("model:\n  dtype: bf16\n")
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "model dtype bf16 (Megatron and vLLM)" in md
    assert "| generate | 5.00 | 2 | 4.50 |" in md
    assert "| train | 6.50 | 1 | 6.00 |" in md
    assert "| **any phase** | 6.50 | | |" in md
