"""SPELL end to end on 2 CPU ranks through the real vLLM engine and Megatron.

The policy is the tiny Llama of `tests.helpers.spell_policy`, taught to emit parseable SPELL text, so every
phase runs for real: questions parse, the grounding filter rejects some, responder groups have reward variance,
verifier votes are valid, one GRPO update per step, and the weights are synced into vLLM after it.

* `test_two_steps_two_ranks`: two full steps with Megatron TP=2 (the export gathers TP shards), old log-probs
  from the training pass, and one vLLM engine per rank (rollout data parallel 2); metrics finite, rollouts
  well formed, weights changed. The run has the rollout correction on: each step's loss equals the one
  recomputed from its dumped rollout (advantages, lengths) and the logged train/rollout log-prob gap. It
  also exports: `megatron-spell export` turns its TP=2 training checkpoint into an HF directory whose
  transformers logits equal the Megatron model's (the checkpoint loaded at TP=2) and not the initial
  model's, and the run's own end-of-training export (`checkpoint.export_hf`, streamed from the live
  shards) is the same tensors.
* `test_preempted_run_resumes_exactly`: the same 2 steps (correction on) with SIGTERM to the torchrun
  process group during step 1 (what Slurm's preemption does): the step finishes, both ranks write the
  checkpoint and exit 42 (torchrun, as its agent does after a signal, exits non-zero); the requeued
  launch resumes at step 1, and its second step's loss, metrics and final weights are identical to the
  straight run's (one launch shared with the test above); without `checkpoint.export_hf` no `hf/` is
  written. The old log-probs recomputed in a separate forward pass
  (`train.recompute_old_logprobs=true`) are checked against the shortcut in
  tests/dist/mcore/test_policy_update.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_spell.convert.hf_io import iter_hf_tensors
from megatron_spell.metrics import read_jsonl
from tests.dist.convert.workers import layouts_worker
from tests.helpers.dist import run_distributed
from tests.helpers.spell_policy import make_spell_policy

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {
        "data_source": "hotpotqa_docs",
        "question_id": f"row{i}",
        "paragraphs": [
            f"Alpha is a city number {i} on the river.",
            "Beta city has a bridge built in 1987.",
            "Gamma is a small village.",
        ],
    }
    for i in range(4)
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    hf_dir = make_spell_policy()
    ckpt = tmp_path_factory.mktemp("ckpt") / "mcore"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/convert_hf_to_megatron.py"),
            "--hf-dir",
            str(hf_dir),
            "--out-dir",
            str(ckpt),
            "--dtype",
            "fp32",
        ],
        check=True,
        capture_output=True,
    )
    corpus = tmp_path_factory.mktemp("data") / "docs.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return hf_dir, ckpt, corpus


def _overrides(hf_dir, ckpt, corpus, out_dir, run_name, steps):
    return [
        f"model.hf_dir={hf_dir}",
        f"model.load={ckpt}",
        "model.dtype=fp32",
        f"output_dir={out_dir}",
        f"run_name={run_name}",
        "parallel.tensor_model_parallel_size=2",
        f"data.paths=[{corpus}]",
        "data.gen_batch_size=4",
        "data.tasks={hotpotqa: [doc_general_qa]}",
        "data.domain_weights={doc_general_qa: 1.0}",
        "data.n_docs={default: [2]}",
        "spell.train_batch_size=1",
        "spell.responder_n=4",
        "spell.verifier_n=2",
        "spell.max_num_gen_batches=3",
        "spell.on_batch_shortfall=train_available",
        "spell.verifier_lower=0.0",
        "spell.verifier_upper=1.0",
        "rollout.top_p=1.0",  # old log-probs are then exactly the sampling distribution's
        "rollout.max_prompt_length=1024",
        "rollout.max_response_length=96",
        "rollout.kv_cache_gib=0.25",
        "rollout.max_num_batched_tokens=2048",
        "train.lr=1e-5",  # small: the tiny policy keeps its behaviour, the weights still move
        "train.max_tokens_per_microbatch=4096",
        "train.logprob_chunk_size=256",
        "train.recompute=none",
        f"train.total_steps={steps}",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=3",
        "logging.dump_rollouts=true",
        "logging.tensorboard=true",
    ]


def _train(overrides, timeout=1500):
    """`torchrun --nproc-per-node 2 -m megatron_spell train ...`, the way users launch it."""
    proc = subprocess.run(
        _cmd(overrides), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _cmd(overrides):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "megatron_spell",
        "train",
        *overrides,
    ]


def _env():
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        # as examples/slurm/spell.sbatch: torchrun gives the ranks time to save after a SIGTERM
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "900",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a saved step, whatever layout wrote them."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    if not dist.is_initialized():  # the reader needs a (one-rank) process group
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )

    tensors = load_plain_tensors(str(ckpt_dir / "model"))
    return {
        k: v
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor) and not k.startswith("optimizer")
    }


# The rollout correction of the 30B preset (token level, mask band [0.5, 5], veto 1e-4) with a TIS lower
# bound of 1.25: fp32 vLLM and Megatron agree to well within a factor 1.25, so every weight is exactly
# 1.25, nothing is masked, and the corrected loss is 1.25 x the on-policy GRPO loss, whatever the gap.
CORRECTION = [
    "train.rollout_is=token",
    "train.rollout_is_threshold=[1.25, 5.0]",
    "train.rollout_rs=token",
    "train.rollout_rs_threshold=[0.5, 5.0]",
    "train.rollout_token_veto_threshold=1e-4",
]


def _check_corrected_loss(run_dir: Path, rows: list[dict]) -> None:
    """Step k's loss from step k's dump: on-policy the GRPO token loss is -A (ratio 1), times the
    factor 1.25, token mean over every response token of the batch (docs/spell-algorithm.md §5)."""
    for step, row in enumerate(rows):
        # the logged gap bounds every token's ratio inside (0.8, 1.25): below the TIS lower bound,
        # inside the mask band, far above the veto
        assert row["train/logprob_mismatch_max"] < math.log(1.25), row
        lines = (run_dir / "rollouts" / f"step_{step:08d}.jsonl").read_text().splitlines()
        trajs = [json.loads(x) for x in lines]
        n = sum(len(t["response_ids"]) for t in trajs)
        assert row["train/num_tokens"] == n
        expect = sum(-1.25 * t["advantage"] * len(t["response_ids"]) for t in trajs) / n
        assert row["train/loss"] == pytest.approx(expect, rel=1e-5, abs=1e-6), (row, expect)
        assert row["train/rollout_corr/weight_mean"] == pytest.approx(1.25)
        assert row["train/rollout_corr/truncated_frac"] == 1.0
        assert row["train/rollout_corr/masked_frac"] == row["train/rollout_corr/vetoed_frac"] == 0
        for role in {t["role"] for t in trajs}:
            assert row[f"train/rollout_corr/{role}/weight_max"] == pytest.approx(1.25), role


@pytest.fixture(scope="module")
def straight(policy, tmp_path_factory):
    """Two steps in one launch: checked by `test_two_steps_two_ranks`, the reference of the resume test."""
    hf_dir, ckpt, corpus = policy
    out = tmp_path_factory.mktemp("straight")
    overrides = _overrides(hf_dir, ckpt, corpus, out, "straight", 2)
    _train([*overrides, *CORRECTION, "checkpoint.export_hf=true"])  # also writes <run_dir>/hf/
    return out / "straight"


def _check_step_metrics(rows: list[dict]) -> None:
    for r in rows:
        bad = {k: v for k, v in r.items() if not math.isfinite(v)}
        assert not bad, bad
        assert r["questioner/num_prompts"] >= 4
        assert r["batch/num_responder"] >= 4  # at least one responder group of 4 trained
        assert (
            r["train/num_sequences"]
            == r["batch/num_responder"] + r["batch/num_questioner"] + r["batch/num_verifier"]
        )
        assert r["sync/bytes"] > 0 and r["sync/seconds"] > 0
        # vLLM and Megatron agree on the sampled tokens
        assert r["train/logprob_mismatch_mean"] < 1e-3


@pytest.mark.slow
def test_two_steps_two_ranks(policy, straight, tmp_path):
    run_dir = straight
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    _check_step_metrics(rows)
    _check_corrected_loss(run_dir, rows)
    # rollouts are well formed: the dumped batch of every step
    for step in (0, 1):
        lines = (run_dir / "rollouts" / f"step_{step:08d}.jsonl").read_text().splitlines()
        trajs = [json.loads(x) for x in lines]
        assert {t["role"] for t in trajs} >= {"responder", "questioner"}
        for t in trajs:
            assert len(t["logprobs"]) == len(t["response_ids"]) > 0
            assert all(
                isinstance(i, int) and 0 <= i < 512 for i in t["prompt_ids"] + t["response_ids"]
            )
            assert all(lp <= 0.0 for lp in t["logprobs"])
        groups = {}
        for t in trajs:
            if t["role"] == "responder":
                groups.setdefault(t["uid"], []).append(t["reward"])
        assert all(len(g) == 4 and len(set(g)) > 1 for g in groups.values())
    # the update changed the weights, and both steps were checkpointed
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000001", "step_00000002"]
    w1, w2 = _weights(steps[0]), _weights(steps[1])
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert (run_dir / "report.png").is_file() and list((run_dir / "tensorboard").iterdir())
    _check_export(policy[0], run_dir, steps[1], tmp_path / "exported")


def _hf_logits(hf_dir: Path, tokens: list[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _check_export(hf_dir: Path, run_dir: Path, last: Path, out: Path) -> None:
    """The run's latest checkpoint (saved at TP=2 with its optimizer) through `megatron-spell export`."""
    import numpy as np
    from transformers import AutoTokenizer

    from megatron_spell.cli import main as cli_main

    # in this process (it holds a one-rank group since `_weights`): the command's code without the
    # seconds of a new interpreter's imports
    assert cli_main(["export", str(run_dir), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    exported, initial = dict(iter_hf_tensors(out)), dict(iter_hf_tensors(hf_dir))
    assert exported.keys() == initial.keys()
    assert any(not torch.equal(exported[k], initial[k]) for k in initial)  # the trained weights
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Which document names the city? Alpha or Beta."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    tokens = tok.encode(text, add_special_tokens=False)
    layout = {"tp2": {"tensor_model_parallel_size": 2}}
    per_rank = run_distributed(layouts_worker, 2, str(hf_dir), str(last / "model"), layout, tokens)
    megatron = next(r["tp2"] for r in per_rank if r)
    diff = float(np.abs(_hf_logits(out, tokens) - megatron).max())
    drift = float(np.abs(_hf_logits(hf_dir, tokens) - megatron).max())
    print(f"export: max |transformers - megatron| logits {diff:.2e}; initial model {drift:.2e}")
    assert diff <= 5e-5, diff  # measured 4.8e-06 (fp32); the initial model is off by ~4e-02
    assert drift > 10 * max(diff, 1e-6), (drift, diff)  # the Megatron model is the trained one
    live = dict(iter_hf_tensors(run_dir / "hf"))  # checkpoint.export_hf, at the end of the run
    assert live.keys() == exported.keys()
    assert [k for k in live if not torch.equal(live[k], exported[k])] == []


@pytest.mark.slow
def test_preempted_run_resumes_exactly(policy, straight, tmp_path):
    hf_dir, ckpt, corpus = policy
    overrides = [*_overrides(hf_dir, ckpt, corpus, tmp_path, "preempted", 2), *CORRECTION]
    overrides = [o for o in overrides if not o.startswith("checkpoint.save_interval")]
    overrides.append("checkpoint.save_interval=0")  # only the preemption and the final step save
    log_path = tmp_path / "preempted.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            _cmd(overrides),
            cwd=ROOT,
            env=_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a Slurm job step
        )
        try:
            deadline = time.monotonic() + 900
            # "resolved config" is logged once the engines are built and the SIGTERM handler is installed
            while "resolved config" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-6000:]
                assert time.monotonic() < deadline, "the run never started its first step"
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks, as Slurm delivers it
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = log_path.read_text()
    # torchrun exits non-zero after a signal; the sbatch script requeues
    assert rc != 0, log[-6000:]
    assert log.count("SIGTERM received") >= 2, log[-6000:]  # both ranks got it
    assert "preempted: checkpoint of step 1 written; exiting with code 42" in log, log[-6000:]
    run_dir = tmp_path / "preempted"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1], log[-6000:]  # step 1 finished, step 2 never started
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000001"], log[-6000:]
    assert (steps[0] / "COMPLETE").is_file()
    # the requeued job: same command, resumes at step 1 and runs step 2, exactly as the straight run
    _train(overrides)
    a = read_jsonl(straight / "metrics.jsonl")
    b = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        keys = {k for k in ra if not k.startswith(("timing/", "sync/", "memory/"))}
        diff = {k: (ra[k], rb.get(k)) for k in keys if ra[k] != rb.get(k)}
        assert not diff, diff
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1] == "step_00000002"
    wa = _weights(straight / "checkpoints" / "step_00000002")
    wb = _weights(run_dir / "checkpoints" / "step_00000002")
    assert wa and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert not (run_dir / "hf").exists()  # checkpoint.export_hf is off there
