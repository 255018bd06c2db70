"""Export a Megatron-Core checkpoint written by convert_hf_to_megatron.py to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --ckpt-dir CKPT_DIR --out-dir HF_DIR [--dtype bf16|fp32]

Writes size-bounded safetensors shards with model.safetensors.index.json (one model.safetensors when it
fits), config.json, generation_config.json and tokenizer files, loadable by transformers and vLLM.
Bad input prints one error line and exits with status 2.
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
        "--ckpt-dir", required=True, help="checkpoint dir (with latest_checkpointed_iteration.txt)"
    )
    ap.add_argument("--out-dir", required=True, help="HF output directory")
    ap.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: as stored"
    )
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size bound")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Megatron/torch warn at import about missing TE/apex and deprecations: noise for a CLI user.
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from megatron_spell.mcore.checkpoint import DTYPES, convert_megatron_to_hf

    try:
        s = convert_megatron_to_hf(
            args.ckpt_dir,
            args.out_dir,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: {s.tensors} tensors, {s.bytes_written / 1e6:.1f} MB in {s.seconds:.1f} s "
        f"({s.mb_per_s:.1f} MB/s); peak RSS {s.peak_rss_mb:.0f} MB (baseline {s.baseline_rss_mb:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
