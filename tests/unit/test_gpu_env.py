"""tests/helpers/gpu_env.py: the session blanks CUDA_VISIBLE_DEVICES except for the GPU tier."""

from __future__ import annotations

import pytest

from tests.helpers.gpu_env import hide_gpus, marker_expressions, selects_gpu


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["pytest", "tests/unit"], []),
        (["pytest", "-m", "gpu"], ["gpu"]),
        (["pytest", "-mgpu and not slow", "tests"], ["gpu and not slow"]),
        (["pytest", "--markexpr=not gpu"], ["not gpu"]),
        (["pytest", "--markexpr", "slow"], ["slow"]),
    ],
)
def test_marker_expressions(argv, expected):
    assert marker_expressions(argv) == expected


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("gpu", True),
        ("gpu and not slow", True),
        ("slow or gpu", True),
        ("not gpu", False),
        ("not slow", False),
        ("gpus", False),
        ("dist and not gpu", False),
    ],
)
def test_selects_gpu(expr, expected):
    assert selects_gpu(expr) is expected


def test_hide_gpus_unless_the_gpu_tier_runs():
    assert hide_gpus({}, ["pytest", "tests/unit"])
    assert hide_gpus({}, ["pytest", "-m", "not gpu"])
    assert hide_gpus({"MEGATRON_SPELL_GPU_TESTS": "0"}, ["pytest"])
    assert not hide_gpus({}, ["pytest", "-m", "gpu", "tests/gpu"])
    assert not hide_gpus({"MEGATRON_SPELL_GPU_TESTS": "1"}, ["pytest"])
    assert not hide_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, ["pytest"])  # the caller's choice stays
