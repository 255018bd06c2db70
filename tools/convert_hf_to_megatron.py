"""Convert a Hugging Face model directory into a Megatron-Core distributed checkpoint (torch_dist).

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out-dir CKPT_DIR [--dtype bf16|fp32]

The checkpoint loads at any TP/PP/EP layout (dist_checkpointing reshards) and carries the HF config and
tokenizer in CKPT_DIR/hf/. Layout and memory: megatron_spell/mcore/checkpoint.py. Bad input (missing
files, unsupported architecture, wrong tensor shapes) prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--hf-dir", required=True, help="HF model directory (config.json + safetensors)"
    )
    ap.add_argument("--out-dir", required=True, help="new or empty output directory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Megatron/torch warn at import about missing TE/apex and deprecations: noise for a CLI user.
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from megatron_spell.mcore.checkpoint import DTYPES, convert_hf_to_megatron

    try:
        s = convert_hf_to_megatron(
            args.hf_dir, args.out_dir, dtype=DTYPES[args.dtype], progress=not args.quiet
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: {s.tensors} tensors, {s.bytes_written / 1e6:.1f} MB in {s.seconds:.1f} s "
        f"({s.mb_per_s:.1f} MB/s); peak RSS {s.peak_rss_mb:.0f} MB (baseline {s.baseline_rss_mb:.0f} MB)"
    )
    return 0


if __name__ == "__main__":  # dist_checkpointing.save spawns helper processes: the guard is required
    sys.exit(main())
