"""HF -> Megatron -> HF through the two CLI tools is bit-exact, and the export loads in transformers.

Tiny random models of every family; the export of one is forced into several safetensors shards (with
model.safetensors.index.json) to exercise the size bound. The re-exported directory must hold exactly the
original tensor names, dtypes and values, the same config, the tokenizer and chat template, and give the
original model's logits in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_spell.convert.hf_io import iter_hf_tensors
from tests.e2e.convert.conftest import VARIANTS

pytestmark = pytest.mark.slow


def _config(model_dir: Path) -> dict:
    """config.json without the fields an export may legitimately rewrite (its dtype, the writer's
    transformers version)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    return cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_roundtrip_is_bit_exact_and_loads(roundtrip, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, _ckpt, back = roundtrip[variant]
    orig = dict(iter_hf_tensors(hf))
    new = dict(iter_hf_tensors(back))
    assert set(new) == set(orig)
    for name, t in orig.items():
        assert new[name].dtype == t.dtype and torch.equal(new[name], t), name
    assert _config(back) == _config(hf)
    tok = AutoTokenizer.from_pretrained(back)
    msgs = [{"role": "user", "content": "Where does chapter one begin?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    a = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(**ids).logits, b(**ids).logits)


def test_export_is_sharded_with_an_index(roundtrip):
    back = roundtrip["qwen3_moe"][2]
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (back / "model.safetensors").exists()
    for shard in shards:
        assert (back / shard).stat().st_size <= 0.0005 * 1024**3 + 300_000  # bound + one tensor
        assert set(load_file(back / shard)) == {
            k for k, v in index["weight_map"].items() if v == shard
        }
