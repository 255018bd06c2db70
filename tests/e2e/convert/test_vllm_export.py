"""The exported HF directory (per-expert MoE layout, tied/untied heads) loads in vLLM as it is.

HF -> Megatron -> HF with the CLI tools, then vLLM (CPU, fp32) greedy-decodes chat prompts from the export
and must produce exactly transformers' greedy tokens from the original directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.convert.test_roundtrip import run_driver
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
NUM_TOKENS = 8


def hf_greedy(hf_dir: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("family,tied", [("qwen3_moe", False), ("qwen3", True)])
def test_vllm_loads_the_export(tmp_path, family, tied):
    from transformers import AutoTokenizer

    hf = make_tiny_hf_model(tmp_path / "hf", family, tied=tied, seed=7)
    run_driver("to_megatron", [(hf, tmp_path / "ckpt")])
    run_driver("to_hf", [(tmp_path / "ckpt", tmp_path / "back")])
    tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q in ("Where does chapter one begin?", "How long is the bridge?")
    ]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "e2e" / "convert" / "vllm_greedy.py"),
            str(tmp_path / "back"),
            json.dumps(prompts),
            str(NUM_TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(hf, prompt, NUM_TOKENS)
