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

    # A checkpoint whose tensors do not match its config.json (intermediate_size edited).
    hf = make_tiny_hf_model(tmp_path / "llama", "llama")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 320
    (hf / "config.json").write_text(json.dumps(cfg))
    proc = _run_tool("--hf-dir", str(hf), "--out-dir", str(tmp_path / "o2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "shape mismatch" in proc.stderr and "mlp." in proc.stderr and "320" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _run_tool("--hf-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o3"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
