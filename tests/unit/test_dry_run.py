"""`megatron-spell train --dry-run` passes for every shipped cluster config and rejects impossible layouts."""

from pathlib import Path

import pytest

from megatron_spell.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/**/*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_example_dry_run(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert "dry run OK" in capsys.readouterr().out


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
