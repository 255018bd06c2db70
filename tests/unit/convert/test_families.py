"""The model-family registry is the one source the builder, converter, ModelShape and engine read.

- every registered family's facts reach the builder's TransformerConfig, the converter's tensor names,
  `ModelShape` and the engine's MoE check, compared with hand-written expectations;
- the MoE layer rule gives the same layers in all of them;
- every rejected HF flag is rejected by all three config readers, naming the flag;
- a throwaway entry (a renamed copy of each family, registered only inside the test) is unknown to all
  of them before it is registered and accepted by all of them after, with no other edit.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_spell import families as registry
from megatron_spell.config import ParallelConfig
from megatron_spell.convert import (
    expected_megatron_names,
    hf_to_megatron_state_dict,
    megatron_to_hf,
)
from megatron_spell.convert.hf_io import iter_hf_tensors
from megatron_spell.families import FAMILIES, ModelFamily, is_moe_config
from megatron_spell.layout import ModelShape
from tests.helpers.tiny_models import renamed_family, tiny_family_config_kwargs

# Hand-written facts of the shipped families (an independent reference for the registry).
EXPECTED = {  # name -> (architecture, q/k/v bias, q/k norm, MoE)
    "llama": ("LlamaForCausalLM", False, False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False, False),
    "qwen3": ("Qwen3ForCausalLM", False, True, False),
    "qwen3_moe": ("Qwen3MoeForCausalLM", False, True, True),
}


def transformer_config(hf_config: Any):
    from megatron_spell.mcore.model import transformer_config_from_hf

    return transformer_config_from_hf(hf_config, ParallelConfig())


def hf_config_of(family: ModelFamily, model_type: str | None = None, **overrides: Any) -> Any:
    """A transformers config of a tiny `family` model that names the family's own architecture."""
    kw = {**tiny_family_config_kwargs(family), **overrides}
    cfg = AutoConfig.for_model(model_type or family.model_types[0], **kw)
    cfg.architectures = [family.architectures[0]]
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(cfg.to_json_string())


def test_shipped_families_are_registered_with_their_facts():
    facts = {
        n: (f.architectures[0], f.qkv_bias, f.qk_norm, f.moe is not None)
        for n, f in FAMILIES.items()
    }
    assert facts == EXPECTED
    archs = registry.supported_architectures()
    assert len(archs) == len(set(archs)), "an architecture is claimed by two families"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_reader_takes_the_family_facts_from_the_registry(name, tmp_path):
    family = FAMILIES[name]
    cfg = hf_config_of(family)
    tc = transformer_config(cfg)
    assert (tc.add_qkv_bias, tc.qk_layernorm) == (family.qkv_bias, family.qk_norm)
    assert (tc.num_moe_experts or 0) == (4 if family.moe else 0)
    names = expected_megatron_names(cfg)
    assert any("linear_qkv.bias" in n for n in names) == family.qkv_bias
    assert any("q_layernorm" in n for n in names) == family.qk_norm
    assert sum("mlp.router.weight" in n for n in names) == (2 if family.moe else 0)
    assert "output_layer.weight" in names  # untied
    shape = ModelShape.from_hf_config(config_dict(cfg))
    assert (shape.num_experts, shape.moe_topk) == ((4, 2) if family.moe else (0, 0))
    assert shape.architecture == family.architectures[0]
    assert is_moe_config(config_dict(cfg)) == (family.moe is not None)


@pytest.mark.parametrize(
    "overrides, moe_layers",
    [
        ({}, [0, 1, 2, 3, 4, 5]),
        ({"decoder_sparse_step": 2}, [1, 3, 5]),
        ({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, [1, 5]),
        ({"mlp_only_layers": [0, 4]}, [1, 2, 3, 5]),
        ({"num_experts": 0}, []),
    ],
)
def test_moe_layer_rule_is_the_same_in_builder_converter_and_shape(overrides, moe_layers):
    family = FAMILIES["qwen3_moe"]
    cfg = hf_config_of(family, num_hidden_layers=6, **overrides)
    pattern = [int(i in moe_layers) for i in range(6)]
    assert family.moe_layer_pattern(cfg) == pattern
    tc = transformer_config(cfg)
    if not moe_layers:
        assert not tc.num_moe_experts
    else:
        assert tc.moe_layer_freq == (1 if all(pattern) else pattern)
    names = expected_megatron_names(cfg)
    routers = [int(n.split(".")[2]) for n in names if n.endswith("mlp.router.weight")]
    dense = [int(n.split(".")[2]) for n in names if n.endswith("mlp.linear_fc2.weight")]
    assert routers == moe_layers and dense == [i for i in range(6) if i not in moe_layers]
    assert ModelShape.from_hf_config(config_dict(cfg)).num_experts == (4 if moe_layers else 0)


BAD_VALUES = {
    "hidden_act": "gelu",
    "use_sliding_window": True,
    "attention_bias": True,
    "mlp_bias": True,
    "shared_expert_intermediate_size": 64,
}


@pytest.mark.parametrize(
    "name, flag",
    [(n, flag.name) for n, f in FAMILIES.items() for flag in f.rejected],
)
def test_rejected_flags_fail_every_config_reader(name, flag):
    from megatron_spell.convert import get_family

    cfg = hf_config_of(FAMILIES[name])
    setattr(cfg, flag, BAD_VALUES[flag])
    for read in (
        transformer_config,
        get_family,
        lambda c: ModelShape.from_hf_config(config_dict(c)),
    ):
        with pytest.raises(ValueError, match=f"{flag}={BAD_VALUES[flag]!r} is not supported"):
            read(cfg)


def test_qwen2_ignores_the_bias_flags_it_always_has():
    cfg = hf_config_of(FAMILIES["qwen2"])
    cfg.attention_bias = True
    assert transformer_config(cfg).add_qkv_bias


def converter_roundtrip(cfg: Any, out: Path) -> None:
    """The saved tensors of a random tiny model -> Megatron -> HF are exactly the same tensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32)
    model.save_pretrained(out)  # (this rewrites the architectures of the model's config copy)
    hf = dict(iter_hf_tensors(out))
    back: dict[str, torch.Tensor] = {}
    for mg_name, tensor in hf_to_megatron_state_dict(iter(hf.items()), cfg):
        back.update(megatron_to_hf(mg_name, tensor, cfg))
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("base_name", list(FAMILIES))
def test_a_new_entry_needs_no_edit_elsewhere(base_name, monkeypatch, tmp_path):
    from megatron_spell.convert import get_family

    base = FAMILIES[base_name]
    new = renamed_family(base)
    cfg = hf_config_of(new, model_type=base.model_types[0])
    arch = new.architectures[0]
    readers = (transformer_config, get_family, lambda c: ModelShape.from_hf_config(config_dict(c)))
    for read in readers:
        with pytest.raises(ValueError, match=f"unsupported architecture.*{arch}"):
            read(cfg)

    monkeypatch.setitem(FAMILIES, new.name, new)
    assert arch in registry.supported_architectures()
    tc = transformer_config(cfg)
    assert (tc.add_qkv_bias, tc.qk_layernorm) == (base.qkv_bias, base.qk_norm)
    assert get_family(cfg) is new
    shape = ModelShape.from_hf_config(config_dict(cfg))
    assert shape.architecture == arch
    assert shape.num_experts == (4 if base.moe else 0)
    assert is_moe_config(config_dict(cfg)) == (base.moe is not None)
    base_cfg = hf_config_of(base)
    assert expected_megatron_names(cfg) == expected_megatron_names(base_cfg)
    converter_roundtrip(cfg, tmp_path / "hf")
    # found by model_type alone as well, when a config names no architecture
    by_type = {**config_dict(cfg), "architectures": None, "model_type": new.model_types[0]}
    assert get_family(by_type) is new
