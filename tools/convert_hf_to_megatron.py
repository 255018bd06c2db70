"""Convert a Hugging Face model directory into a Megatron-Core distributed checkpoint (torch_dist).

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out-dir CKPT_DIR [--dtype bf16|fp32]

The checkpoint loads at any TP/PP/EP layout (dist_checkpointing reshards) and carries the HF config and
tokenizer in CKPT_DIR/hf/. Layout and memory: megatron_spell/mcore/checkpoint.py. Bad input (missing
files, unsupported architecture, wrong tensor shapes) prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_spell.convert.cli import run_conversion  # noqa: E402


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--hf-dir", required=True, help="HF model directory (config.json + safetensors)"
    )
    ap.add_argument("--out-dir", required=True, help="new or empty output directory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def _convert(args: argparse.Namespace):
    from megatron_spell.mcore.checkpoint import DTYPES, convert_hf_to_megatron

    return convert_hf_to_megatron(
        args.hf_dir, args.out_dir, dtype=DTYPES[args.dtype], progress=not args.quiet
    )


def main(argv: list[str] | None = None) -> int:
    return run_conversion(__doc__, argv, _arguments, _convert)


if __name__ == "__main__":  # dist_checkpointing.save spawns helper processes: the guard is required
    sys.exit(main())
