"""Export a Megatron-Core checkpoint (converted or trained) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --ckpt-dir CKPT_DIR --out-dir HF_DIR [--dtype bf16|fp32]
    python tools/convert_megatron_to_hf.py --ckpt-dir RUN_DIR [--step N] --out-dir HF_DIR

CKPT_DIR: a checkpoint written by convert_hf_to_megatron.py, or a training run directory (then the
checkpoint of step N, default the latest complete one), or one of its `checkpoints/step_XXXXXXXX`
directories, saved at any TP/PP/EP layout (the same as `megatron-spell export RUN_DIR`).

Writes size-bounded safetensors shards with model.safetensors.index.json (one model.safetensors when it
fits), config.json, generation_config.json and tokenizer files, loadable by transformers and vLLM.
Bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_spell.convert.cli import add_export_arguments, export, run_conversion  # noqa: E402


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--ckpt-dir",
        required=True,
        help="converted checkpoint dir (with latest_checkpointed_iteration.txt), or a training run "
        "dir, or one of its checkpoints/step_XXXXXXXX",
    )
    ap.add_argument("--out-dir", required=True, help="HF output directory")
    add_export_arguments(ap)


def main(argv: list[str] | None = None) -> int:
    return run_conversion(
        __doc__, argv, _arguments, lambda args: export(args, args.ckpt_dir, args.out_dir)
    )


if __name__ == "__main__":
    sys.exit(main())
