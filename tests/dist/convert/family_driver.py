"""One rank: convert, build, run and export tiny models of model families (test_families.py).

`family_cases(rank, world, renamed, cases)` runs under `run_distributed(..., 1)`. For each case
(name, HF, CKPT, BACK): HF -> Megatron checkpoint (CKPT), the model built by `build_model` and loaded from
it, its fp32 logits of TOKENS saved to BACK.logits.npy, then CKPT -> HF again (BACK). Each base family in
`renamed` first registers its throwaway copy (tests/helpers/tiny_models.py `renamed_family`) in this rank
only, for the duration of the call.
"""

from __future__ import annotations

import numpy as np

TOKENS = [1, 17, 250, 33, 4, 98, 7, 301, 12, 45, 2, 480, 66, 3, 200, 9]


def family_cases(rank: int, world: int, renamed: list[str], cases: list[tuple[str, ...]]) -> None:
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

    added = [renamed_family(FAMILIES[base]) for base in renamed]
    FAMILIES.update({f.name: f for f in added})
    try:
        for _name, hf_dir, ckpt_dir, back_dir in cases:
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
    finally:  # the registry is process-global and this rank is reused
        for f in added:
            FAMILIES.pop(f.name, None)
