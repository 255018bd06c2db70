"""Export a Megatron-Core checkpoint written by convert_hf_to_megatron.py to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --ckpt-dir CKPT_DIR --out-dir HF_DIR [--dtype bf16|fp32]

Writes size-bounded safetensors shards with model.safetensors.index.json (one model.safetensors when it
fits), config.json, generation_config.json and tokenizer files, loadable by transformers and vLLM.
Bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_spell.convert.cli import run_conversion  # noqa: E402


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--ckpt-dir", required=True, help="checkpoint dir (with latest_checkpointed_iteration.txt)"
    )
    ap.add_argument("--out-dir", required=True, help="HF output directory")
    ap.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: as stored"
    )
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size bound")


def _convert(args: argparse.Namespace):
    from megatron_spell.mcore.checkpoint import DTYPES, convert_megatron_to_hf

    return convert_megatron_to_hf(
        args.ckpt_dir,
        args.out_dir,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    return run_conversion(__doc__, argv, _arguments, _convert)


if __name__ == "__main__":
    sys.exit(main())
