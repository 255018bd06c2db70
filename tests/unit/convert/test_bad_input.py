"""Bad input to the converter: clear FileNotFoundError / ValueError naming the thing, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_spell.convert.hf_io import check_hf_dir
from tests.helpers.tiny_models import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[3]


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_hf_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        check_hf_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    from megatron_spell.convert.hf_io import weight_files

    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        weight_files(tmp_path)


def test_checkpoint_dir_errors(tmp_path):
    from megatron_spell.mcore.checkpoint import hf_dir_of, resolve_release_dir

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_release_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a Megatron checkpoint"):
        resolve_release_dir(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        resolve_release_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_dir_of(tmp_path)


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), *args, "--quiet"],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_cli_unsupported_architecture_and_bad_shape(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    save_file({"wte.weight": torch.zeros(2, 2)}, gpt2 / "model.safetensors")
    proc = _run_tool("--hf-dir", str(gpt2), "--out-dir", str(tmp_path / "o1"))
    assert proc.returncode == 2
    assert "GPT2LMHeadModel" in proc.stderr and "Qwen3MoeForCausalLM" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_shape_and_missing_dir_in_process(tmp_path, capsys):
    """The tool's `main` (what the subprocess above runs after its imports), in this interpreter."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron", ROOT / "tools" / "convert_hf_to_megatron.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # A checkpoint whose tensors do not match its config.json (intermediate_size edited).
    hf = make_tiny_hf_model(tmp_path / "llama", "llama")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 320
    (hf / "config.json").write_text(json.dumps(cfg))
    assert tool.main(["--hf-dir", str(hf), "--out-dir", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "mlp." in err and "320" in err, err[-2000:]
    args = ["--hf-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o3"), "--quiet"]
    assert tool.main(args) == 2
    assert "does not exist" in capsys.readouterr().err
