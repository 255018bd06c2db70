"""Megatron-Core integration: the only package (with convert/) that imports megatron.

Submodules: cpu_support (CPU patches), parallel (ParallelContext), model (HF config -> GPTModel), and the
training-engine, checkpoint and export modules. Import submodules explicitly. Importing this package
patches nothing (the CPU patches are the explicit `cpu_support.apply_cpu_patches()`, made by
`parallel.init_parallel`); its one action is for machines without triton, where megatron cannot be
imported at all: it registers a stand-in for megatron's triton kernel module first (cpu_support).
"""

import importlib.util


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


if not _triton_installed():
    from megatron_spell.mcore.cpu_support import provide_paged_stash_stand_in

    provide_paged_stash_stand_in()
