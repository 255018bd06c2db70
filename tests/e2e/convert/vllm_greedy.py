"""Greedy-decode token prompts with vLLM (CPU, fp32) from a model directory; print one RESULT JSON line.

    python tests/e2e/convert/vllm_greedy.py MODEL_DIR '[[1, 2, 3], ...]' NUM_TOKENS

Run as its own process: vLLM needs a `__main__` guard and must not share a process with the Megatron CPU
patches of other tests.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model_dir, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
