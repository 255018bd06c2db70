"""The eval CLI builds the engine's RolloutConfig from its flags; errors name the flag."""

from __future__ import annotations

import argparse

import pytest

from megatron_spell.eval.cli import add_eval_arguments, engine_settings


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(["--model", "m", "--data", "d", "--out", "o", *flags])


def test_flags_become_the_rollout_section():
    s = engine_settings(_args("--max-input-tokens", "300", "--max-new-tokens", "20", "--seed", "3"))
    assert (s.max_prompt_length, s.max_response_length, s.seed) == (300, 20, 3)
    assert s.max_num_batched_tokens is None  # vLLM's own default, as before
    judge = engine_settings(_args("--max-new-tokens", "20", "--judge", "engine"))
    assert judge.max_response_length == 1024  # room for the engine judge's verdicts


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--max-input-tokens", "0"), "--max-input-tokens 0: must be > 0"),
        (("--max-new-tokens", "-1"), r"--max-new-tokens -1: must be > 0"),
        (("--gpu-memory-utilization", "1.5"), r"--gpu-memory-utilization 1.5: must be in \(0, 1\]"),
        (("--kv-cache-gib", "0"), "--kv-cache-gib 0.0: must be > 0"),
    ],
)
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        engine_settings(_args(*flags))


def test_context_longer_than_the_model_is_refused_before_the_engine(tmp_path):
    import json

    from megatron_spell.eval.cli import _check_args

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    ok = _args("--max-input-tokens", "7936", "--max-new-tokens", "256")
    ok.model = str(tmp_path)
    _check_args(ok)
    bad = _args("--max-new-tokens", "256")  # the default 16384 input tokens
    bad.model = str(tmp_path)
    with pytest.raises(
        ValueError, match=r"exceeds the model's context \(8192 .* --max-input-tokens 7936"
    ):
        _check_args(bad)
