"""Greedy-decode token prompts with vLLM (CPU, fp32) from model directories; print one RESULT JSON line.

    python tests/e2e/convert/vllm_greedy.py '{"MODEL_DIR": [[1, 2, 3], ...], ...}' NUM_TOKENS

prints `RESULT {"MODEL_DIR": [[tokens of prompt 1], ...], ...}`; the engines are built one after another.

Run as its own process: vLLM needs a `__main__` guard and must not share a process with the Megatron CPU
patches of other tests.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def main() -> None:
    jobs, n = json.loads(sys.argv[1]), int(sys.argv[2])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    result = {}
    for model_dir, prompts in jobs.items():
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=256)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        result[model_dir] = [list(o.outputs[0].token_ids) for o in outs]
        del llm
        gc.collect()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
