"""End to end: `python -m megatron_spell.eval` on a tiny real model through the real vLLM rollout engine.

Checks the protocol's observable contract on real generation: every file is written, each question has n
samples, long prompts are middle-truncated to exactly --max-input-tokens, and the markdown table agrees with
the per-example JSONL (recomputed independently by brute force). A random tiny model answers nothing right, so
an OpenAI-compatible judge (a local HTTP stub that says YES to some candidates) makes the scores non-trivial and
exercises max(rule, judge) over real model text. The SmolLM2 run evaluates the model that
`megatron-spell export` wrote, so it also shows the exported directory loading in vLLM.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from megatron_spell.eval.cli import main
from megatron_spell.eval.report import METRICS, PLOT, PREDICTIONS, TABLE
from tests.helpers.fake_judge import ChatHandler, serve
from tests.unit.eval.recompute import assert_table_matches

N = 4
MAX_INPUT = 96

LONG_CONTEXT = " ".join(
    f"Passage {i}: the river town of Riverside built a bridge in year {1900 + i}."
    for i in range(40)
)


def _write_data(tmp: Path) -> list[Path]:
    longbench = tmp / "longbench_e.jsonl"
    longbench.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "_id": "lb-long",
                    "input": "When was the bridge built?",
                    "context": LONG_CONTEXT,
                    "answers": ["1987"],
                    "dataset": "hotpotqa_e",
                },
                {
                    "_id": "lb-short",
                    "input": "Who cut the ribbon?",
                    "context": "The mayor, Anna Lopez, cut the ribbon.",
                    "answers": ["Anna Lopez"],
                    "dataset": "musique_e",
                },
            ]
        )
    )
    v2 = tmp / "longbench_v2.json"
    v2.write_text(
        json.dumps(
            [
                {
                    "_id": "v2-1",
                    "question": "How long was the bridge?",
                    "choice_A": "12 meters",
                    "choice_B": "240 meters",
                    "choice_C": "5 meters",
                    "choice_D": "100 meters",
                    "answer": "B",
                    "context": "The bridge was 240 meters long.",
                }
            ]
        )
    )
    docmath = tmp / "docmath.jsonl"
    docmath.write_text(
        json.dumps(
            {
                "question_id": "dm-1",
                "paragraphs": ["The library had 12,000 books.", "It added 3,000 books."],
                "question": "How many books does it have now?",
                "ground_truth": 15000,
            }
        )
        + "\n"
    )
    return [longbench, v2, docmath]


class _Judge(ChatHandler):
    """Says YES to a deterministic half of the candidates (by a checksum of the request)."""

    def reply(self, body):
        content = body["messages"][0]["content"]
        return "[[YES]]" if zlib.crc32(content.encode()) % 2 else "It is NOT a match. [[NO]]"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.mark.slow
def test_eval_tiny_model_through_vllm(tiny_model: Path, tmp_path: Path) -> None:
    server, judge_url = serve(_Judge)
    out = tmp_path / "out"
    argv = [
        "--model", str(tiny_model),
        "--n", str(N),
        "--max-input-tokens", str(MAX_INPUT),
        "--max-new-tokens", "12",
        "--kv-cache-gib", "0.25",
        "--batch-size", "2",
        "--out", str(out),
        "--judge", "openai",
        "--judge-url", judge_url,
        "--judge-model", "stub",
        "--no-progress",
    ]  # fmt: skip
    for path in _write_data(tmp_path):
        argv += ["--data", str(path)]
    try:
        assert main(argv) == 0
    finally:
        server.shutdown()

    for name in (PREDICTIONS, METRICS, TABLE, PLOT):
        assert (out / name).stat().st_size > 0
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["dm-1", "lb-long", "lb-short", "v2-1"]
    assert [r["benchmark"] for r in rows] == ["hotpotqa", "musique", "longbench-v2", "docmath"]
    for r in rows:
        assert len(r["predictions"]) == len(r["scores"]) == len(r["rule_scores"]) == N
        assert all(0 < t <= 12 for t in r["response_tokens"])
        assert r["prompt_tokens"] <= MAX_INPUT
        for rule, judge, final in zip(
            r["rule_scores"], r["judge_scores"], r["scores"], strict=True
        ):
            assert final == (max(rule, judge) if judge is not None else rule)
    long = by_id["lb-long"]
    assert long["truncated"] and long["prompt_tokens"] == MAX_INPUT
    assert long["prompt_tokens_untruncated"] > MAX_INPUT
    assert by_id["v2-1"]["judge_scores"] == [None] * N  # no judge for multiple choice
    judged = [j for r in rows for j in r["judge_scores"] if j is not None]
    assert judged and 0 < sum(judged) < len(judged)  # the stub says YES to some, NO to others
    assert_table_matches((out / TABLE).read_text(), out / PREDICTIONS, [1, 2, 4], n=N)


def _greedy_argv(model: Path, data: list[Path], out: Path) -> list[str]:
    argv = [
        "--model", str(model), "--num-samples", "1", "--temperature", "0",
        "--max-input-tokens", str(MAX_INPUT), "--max-new-tokens", "8", "--kv-cache-gib", "0.25",
        "--batch-size", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    for path in data:
        argv += ["--data", str(path)]
    return argv


@pytest.fixture(scope="module")
def greedy_reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Greedy predictions of a single-process run (TP=1, one replica), by question id."""
    tmp = tmp_path_factory.mktemp("greedy")
    assert main(_greedy_argv(tiny_model, _write_data(tmp), tmp / "out")) == 0
    rows = [json.loads(line) for line in (tmp / "out" / PREDICTIONS).read_text().splitlines()]
    return {r["id"]: r["predictions"][0] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "dp_ranks"), [(1, [0, 1, 0, 1]), (2, [0, 0, 0, 0])])
def test_eval_under_torchrun_matches_single_process(
    tiny_model: Path, greedy_reference: dict[str, str], tmp_path: Path, tp: int, dp_ranks: list[int]
) -> None:
    """torchrun with 2 ranks as two replicas (TP=1, DP=2) or one tensor-parallel replica (TP=2): greedy
    predictions equal the single-process run's, and rank 0 writes the gathered report in question order."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["-m", "megatron_spell.eval", "--tensor-parallel-size", str(tp)]
    cmd += _greedy_argv(tiny_model, _write_data(tmp_path), out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert [r["dp_rank"] for r in rows] == dp_ranks
    assert [r["id"] for r in rows] == ["lb-long", "lb-short", "v2-1", "dm-1"]
    assert {r["id"]: r["predictions"][0] for r in rows} == greedy_reference
    settings = json.loads((out / METRICS).read_text())["settings"]
    assert settings["data_parallel_size"] == 2 // tp and settings["tensor_parallel_size"] == tp
    assert_table_matches((out / TABLE).read_text(), out / PREDICTIONS, [1], n=1)


def _exported_smollm2(tmp: Path) -> Path:
    """SmolLM2-135M-Instruct out of a run directory through `megatron-spell export`.

    The run directory is laid out by hand: the converted Megatron checkpoint stands as the model of
    its step 1 (an export reads only a step's model tensors; a real run's TP=2 checkpoint, optimizer
    included, is exported in tests/e2e/test_spell_train.py). The export equals the original bit for bit.
    """
    import subprocess
    import sys

    import torch

    from megatron_spell.config import dump_config, load_config
    from megatron_spell.convert.hf_io import iter_hf_tensors
    from megatron_spell.convert.smollm2 import materialize_smollm2

    hf = materialize_smollm2()
    root = Path(__file__).resolve().parents[3]

    ckpt, run_dir, out = tmp / "ckpt", tmp / "run", tmp / "exported"
    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    dump_config(
        load_config(None, [f"model.hf_dir={hf}", "model.dtype=fp32"]), run_dir / "config.yaml"
    )
    # one interpreter for both commands (imports dominate); not this one, which runs vLLM
    script = (
        "import sys, pathlib\n"
        "from megatron_spell.mcore.checkpoint import convert_hf_to_megatron\n"
        "from megatron_spell.cli import main\n"
        "hf, ckpt, step, run_dir, out = sys.argv[1:]\n"
        "convert_hf_to_megatron(hf, ckpt, progress=False)\n"
        "(pathlib.Path(ckpt) / 'release').rename(pathlib.Path(step) / 'model')\n"
        "(pathlib.Path(step) / 'COMPLETE').write_text('1\\n')\n"
        "sys.exit(main(['export', run_dir, '--out', out, '--quiet']))\n"
    )
    args = [str(x) for x in (hf, ckpt, step, run_dir, out)]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    orig, new = dict(iter_hf_tensors(hf)), dict(iter_hf_tensors(out))
    assert new.keys() == orig.keys() and all(torch.equal(new[k], orig[k]) for k in orig)
    return out


@pytest.mark.slow
def test_eval_smollm2_scores_real_answers(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, exported from a run directory, answers easy questions in the "The correct
    answer is X" form often enough that the rule scorers give some credit; the table still agrees with
    the JSONL."""
    model = _exported_smollm2(tmp_path)
    data = tmp_path / "easy.jsonl"
    rows_in = [
        {
            "_id": "ribbon",
            "input": "Who cut the ribbon at the bridge opening?",
            "context": "In 1987 the town of Riverside built a new bridge. The mayor, Anna Lopez, cut the "
            "ribbon at the opening.",
            "answers": ["Anna Lopez"],
            "dataset": "hotpotqa_e",
        },
        {
            "_id": "capital",
            "input": "What is the capital of the country Veloria?",
            "context": "Veloria is a small country. Its capital is Durnholm, a city by the sea.",
            "answers": ["Durnholm"],
            "dataset": "hotpotqa_e",
        },
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    out = tmp_path / "out"
    argv = [
        "--model", str(model), "--data", str(data), "--n", "4", "--max-new-tokens", "24",
        "--max-input-tokens", "1024", "--kv-cache-gib", "0.5", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ribbon", "capital"]
    assert all(not r["truncated"] for r in rows)
    assert sum(sum(r["rule_scores"]) for r in rows) > 0
    assert any("answer is" in p for r in rows for p in r["predictions"])
    assert_table_matches((out / TABLE).read_text(), out / PREDICTIONS, [1, 2, 4], n=4)
