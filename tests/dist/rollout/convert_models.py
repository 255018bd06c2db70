"""Convert several HF dirs to Megatron dist checkpoints in ONE process (saves imports).

    python tests/dist/rollout/convert_models.py HF1 OUT1 [HF2 OUT2 ...]

A separate process because the checkpoint writer starts a multiprocessing manager, which a daemonic test
rank may not; the `__main__` guard is required for the same reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main(argv: list[str]) -> int:
    from megatron_spell.mcore.checkpoint import convert_hf_to_megatron

    for hf_dir, out_dir in zip(argv[::2], argv[1::2], strict=True):
        convert_hf_to_megatron(hf_dir, out_dir, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
