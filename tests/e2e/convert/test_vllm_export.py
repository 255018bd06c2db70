"""The exported HF directory (per-expert MoE layout, tied/untied heads) loads in vLLM as it is.

HF -> Megatron -> HF with the CLI tools (the folder's `roundtrip` fixture), then vLLM (CPU, fp32)
greedy-decodes chat prompts from the export and must produce exactly transformers' greedy tokens from the
original directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


FAMILIES = ["qwen3_moe", "qwen3_tied"]  # per-expert MoE export in several shards; a tied head


def _chat_prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q in ("Where does chapter one begin?", "How long is the bridge?")
    ]


@pytest.fixture(scope="module")
def vllm_tokens(roundtrip) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """vLLM's greedy tokens from each export, all models in one vLLM process."""
    jobs = {str(roundtrip[f][2]): _chat_prompts(roundtrip[f][2]) for f in FAMILIES}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "e2e" / "convert" / "vllm_greedy.py"),
            json.dumps(jobs),
            str(NUM_TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    return {f: (jobs[str(roundtrip[f][2])], got[str(roundtrip[f][2])]) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_loads_the_export(roundtrip, vllm_tokens, family):
    hf = roundtrip[family][0]
    prompts, got = vllm_tokens[family]
    assert len(got) == len(prompts)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(hf, prompt, NUM_TOKENS)
