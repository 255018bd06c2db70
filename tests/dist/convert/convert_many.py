"""Run a converter CLI on several (src, out) pairs in ONE process (saves the per-call import time).

    python tests/dist/convert/convert_many.py to_megatron HF1 OUT1 [HF2 OUT2 ...]
    python tests/dist/convert/convert_many.py to_hf CKPT1 OUT1 [CKPT2 OUT2 ...]

Extra tool flags (e.g. `--max-shard-gb 0.001`) come from the CONVERT_EXTRA_ARGS environment variable.

Calls the tools' `main` exactly as the command line would; exits with the first non-zero status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    direction, pairs = argv[0], argv[1:]
    if direction == "to_megatron":
        from convert_hf_to_megatron import main as tool

        src_flag = "--hf-dir"
    else:
        from convert_megatron_to_hf import main as tool

        src_flag = "--ckpt-dir"
    for src, out in zip(pairs[::2], pairs[1::2], strict=True):
        extra = os.environ.get("CONVERT_EXTRA_ARGS", "").split()
        rc = tool([src_flag, src, "--out-dir", out, "--quiet", *extra])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
