"""What the conversion command lines (`tools/convert_hf_to_megatron.py`,
`tools/convert_megatron_to_hf.py`, `megatron-spell export`) share: the `--quiet` flag, quiet imports,
the exit status 2 with one error line on bad input, the export flags and the closing summary line.

Importing this module does not import megatron: a tool's `convert` callable imports
`megatron_spell.mcore.checkpoint` itself, after the import-time warnings are silenced.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def run_conversion(
    doc: str,
    argv: Sequence[str] | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    convert: Callable[[argparse.Namespace], Any],
) -> int:
    """Parse `argv` (the tool's own arguments, then `--quiet`), run `convert(args)` and print its
    stats against `args.out_dir`; 2 with one `error:` line when it raises ValueError or
    FileNotFoundError, 0 otherwise. `doc` is the tool's module docstring (its first line is the
    description)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Megatron/torch warn at import about missing TE/apex and deprecations: noise for a CLI user.
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", FutureWarning)
    try:
        s = convert(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(args.out_dir, s))
    return 0


def summary(out_dir: Any, s: Any) -> str:
    """The closing line: what a conversion (`ConversionStats` `s`) wrote to `out_dir` and cost."""
    return (
        f"wrote {out_dir}: {s.tensors} tensors, {s.bytes_written / 1e6:.1f} MB in "
        f"{s.seconds:.1f} s ({s.mb_per_s:.1f} MB/s); peak RSS {s.peak_rss_mb:.0f} MB "
        f"(baseline {s.baseline_rss_mb:.0f} MB)"
    )


def add_export_arguments(ap: argparse.ArgumentParser) -> None:
    """`--step`, `--dtype`, `--max-shard-gb` of both export command lines."""
    ap.add_argument(
        "--step", type=int, default=None, help="training step to export (default: the latest)"
    )
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="output dtype (default: the dtype the checkpoint holds)",
    )
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size bound")


def export(args: argparse.Namespace, src: str, out_dir: str) -> Any:
    """Run `export_checkpoint` (megatron_spell.mcore.checkpoint) with the parsed export arguments."""
    from megatron_spell.mcore.checkpoint import DTYPES, export_checkpoint

    return export_checkpoint(
        src,
        out_dir,
        step=args.step,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        progress=not args.quiet,
    )
