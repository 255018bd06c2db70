"""Every registered model family builds, converts and round-trips from a tiny config.

Parametrised over the registry itself (megatron_spell/families.py), so a new entry is covered without an
edit here. For each family a tiny random HF model is made from the registry record alone
(tests/helpers/tiny_models.py `make_tiny_family_model`), converted to a Megatron checkpoint, built with
`build_model` and loaded in one rank (family_driver.py): its fp32 logits must match transformers' (max abs
diff <= 1e-4, as in test_convert_logits.py). The checkpoint exported back to HF must hold exactly the original tensors.
Extra cases: a tied head, and a throwaway family (a renamed Qwen3-MoE with a dense first layer) that is
registered only inside the driver's rank, to show that a new entry needs no edit elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_spell.convert.hf_io import iter_hf_tensors
from megatron_spell.families import FAMILIES
from tests.dist.convert.family_driver import TOKENS, family_cases
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import make_tiny_family_model, renamed_family

pytestmark = [pytest.mark.dist, pytest.mark.slow]

THROWAWAY = renamed_family(FAMILIES["qwen3_moe"])  # the driver's rank registers it (`renamed`)
# case name -> (family, transformers model type, tied, config overrides)
CASES = {
    **{name: (f, f.model_types[0], False, {}) for name, f in FAMILIES.items()},
    "llama_tied": (FAMILIES["llama"], "llama", True, {}),
    THROWAWAY.name: (THROWAWAY, "qwen3_moe", False, {"mlp_only_layers": [0]}),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs, cases = {}, []
    for name, (family, model_type, tied, overrides) in CASES.items():
        hf = make_tiny_family_model(
            root / f"{name}_hf", family, model_type=model_type, tied=tied, seed=7, **overrides
        )
        dirs[name] = (hf, root / f"{name}_back")
        cases.append((name, str(hf), str(root / f"{name}_ckpt"), str(root / f"{name}_back")))
    run_distributed(family_cases, 1, ["qwen3_moe"], cases, timeout=900)
    return dirs


def hf_logits(hf_dir: Path) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_family_converts_builds_and_round_trips(results, case):
    hf_dir, back = results[case]
    ref, logits = hf_logits(hf_dir), np.load(f"{back}.logits.npy")
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() <= 1e-4
    orig, new = dict(iter_hf_tensors(hf_dir)), dict(iter_hf_tensors(back))
    assert set(new) == set(orig)
    for name, t in orig.items():
        assert new[name].dtype == t.dtype and torch.equal(new[name], t), name
