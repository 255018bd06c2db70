"""Whether the test session hides the GPUs (pure: no torch import; tests/conftest.py calls it first).

The CPU tiers run with `CUDA_VISIBLE_DEVICES=""` so that torch, Megatron and vLLM take their CPU paths on
any host. The GPU tier (tests marked `gpu`) needs the devices, so they stay visible when:
- `CUDA_VISIBLE_DEVICES` is already set (the caller chose the devices),
- `MEGATRON_SPELL_GPU_TESTS=1`, or
- the `-m` marker expression selects `gpu` tests (`-m gpu`, `-m "gpu and not slow"`; not `-m "not gpu"`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

GPU_ENV_FLAG = "MEGATRON_SPELL_GPU_TESTS"


def marker_expressions(argv: Sequence[str]) -> list[str]:
    """The `-m` / `--markexpr` expressions on a pytest command line."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("-m", "--markexpr") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--markexpr="):
            out.append(arg.split("=", 1)[1])
        elif arg.startswith("-m") and len(arg) > 2 and not arg.startswith("--"):
            out.append(arg[2:])
    return out


def selects_gpu(expression: str) -> bool:
    """True if the marker expression names `gpu` other than negated (`not gpu`)."""
    words = re.findall(r"[\w-]+", expression)
    return any(w == "gpu" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def hide_gpus(environ: Mapping[str, str], argv: Sequence[str]) -> bool:
    """True when the session must blank CUDA_VISIBLE_DEVICES (see the module docstring)."""
    if "CUDA_VISIBLE_DEVICES" in environ or environ.get(GPU_ENV_FLAG) == "1":
        return False
    return not any(selects_gpu(e) for e in marker_expressions(argv))
