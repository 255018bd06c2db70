"""Test-suite wide settings: CPU-only, quiet, deterministic, GPU tests skipped without CUDA.

The GPUs stay visible for the GPU tier (`-m gpu`, MEGATRON_SPELL_GPU_TESTS=1, or CUDA_VISIBLE_DEVICES
set by the caller): tests/helpers/gpu_env.py.
"""

import os
import sys

import pytest

from tests.helpers.gpu_env import hide_gpus

# Before torch/vllm import anywhere: CPU only, in-process vLLM engine, bounded KV cache
# (docs/platform.md).
if hide_gpus(os.environ, sys.argv):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def megatron_on_cpu() -> None:
    """The CPU patches for tests that use Megatron in the pytest process without `init_parallel`
    (which makes the same call in spawned ranks); a no-op with CUDA."""
    from megatron_spell.mcore.cpu_support import apply_cpu_patches

    apply_cpu_patches()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU-only test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
