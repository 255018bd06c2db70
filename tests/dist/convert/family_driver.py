"""One process: convert, build, run and export tiny models of model families (test_families.py).

    python tests/dist/convert/family_driver.py [--renamed BASE ...] NAME HF CKPT BACK [NAME HF CKPT BACK ...]

For each case: HF -> Megatron checkpoint (CKPT), the model built by `build_model` and loaded from it, its
fp32 logits of TOKENS saved to BACK.logits.npy, then CKPT -> HF again (BACK). `--renamed BASE` first
registers the throwaway copy of family BASE (tests/helpers/tiny_models.py `renamed_family`) in this
process only. A plain process rather than a `run_distributed` rank: the checkpoint writer starts worker
processes, which a daemonic rank may not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

TOKENS = [1, 17, 250, 33, 4, 98, 7, 301, 12, 45, 2, 480, 66, 3, 200, 9]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--renamed", action="append", default=[])
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args(argv)

    from megatron_spell.config import ParallelConfig
    from megatron_spell.families import FAMILIES
    from megatron_spell.mcore.checkpoint import (
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        load_checkpoint,
    )
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel, init_parallel
    from tests.dist.convert.workers import forward_logits
    from tests.helpers.tiny_models import renamed_family

    for base in args.renamed:
        family = renamed_family(FAMILIES[base])
        FAMILIES[family.name] = family
    c = args.cases
    for _name, hf_dir, ckpt_dir, back_dir in zip(c[::4], c[1::4], c[2::4], c[3::4], strict=True):
        convert_hf_to_megatron(hf_dir, ckpt_dir, progress=False)
        hf_config = load_hf_config(hf_dir)
        ctx = init_parallel(ParallelConfig())
        try:
            chunks = build_model(hf_config, ctx)
            load_checkpoint(chunks, ckpt_dir)
            logits = forward_logits(
                chunks,
                TOKENS,
                hf_config.hidden_size,
                hf_config.vocab_size,
                ctx.tp_group,
                ctx.pp_group,
            )
        finally:
            destroy_parallel()
        np.save(f"{back_dir}.logits.npy", logits)
        convert_megatron_to_hf(ckpt_dir, back_dir, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
