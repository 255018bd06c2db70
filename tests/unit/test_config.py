"""Config loading: types, overrides, unknown keys, validation messages; layout checks (issue 2 item 2)."""

import json

import pytest

from megatron_spell.config import Config, dump_config, load_config, parse_override
from megatron_spell.layout import ModelShape, estimate_memory_gib, validate_layout, validate_lengths

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_hidden_layers": 48,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "vocab_size": 151936,
    "max_position_embeddings": 262144,
}


def cfg(*overrides: str) -> Config:
    return load_config(None, ["model.hf_dir=/m", *overrides])


def test_defaults_follow_reference_scripts():
    c = cfg()
    assert c.train.lr == 2e-6 and c.rollout.temperature == 0.7 and c.spell.responder_n == 8
    assert c.spell.train_batch_size == 128 and c.data.gen_batch_size == 480


def test_overrides_parse_to_field_types():
    c = cfg(
        "train.lr=1e-5",
        "parallel.sequence_parallel=true",
        "parallel.tensor_model_parallel_size=2",
        "data.paths=[a.jsonl,b.jsonl]",
        "parallel.virtual_pipeline_model_parallel_size=null",
    )
    assert c.train.lr == 1e-5 and isinstance(c.train.lr, float)
    assert c.parallel.sequence_parallel is True
    assert c.data.paths == ("a.jsonl", "b.jsonl")
    assert c.parallel.virtual_pipeline_model_parallel_size is None


def test_override_accepts_comma_list_and_int_for_float():
    c = cfg("data.paths=a.jsonl,b.jsonl", "train.lr=1")
    assert c.data.paths == ("a.jsonl", "b.jsonl") and c.train.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'lr'"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'"),
        ("train.lr=fast", "train.lr='fast': expected a number"),
        ("parallel.tensor_model_parallel_size=1.5", "expected an integer"),
        ("train.loss_agg_mode=sum", "must be one of ['token_mean', 'seq_mean']"),
        ("parallel.sequence_parallel=true", "needs tensor_model_parallel_size > 1"),
        ("spell.responder_n=1", "GRPO needs >= 2 samples"),
        ("data.tasks={web: [doc_qa]}", "tasks must be among"),
    ],
)
def test_bad_values_name_field_and_fix(override, message):
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        cfg(override)


def test_missing_model_section_and_file(tmp_path):
    with pytest.raises(ValueError, match="model.hf_dir"):
        load_config(None, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="expected section.key=value"):
        parse_override("train.lr")


def test_yaml_roundtrip(tmp_path):
    c = cfg("train.lr=3e-6", "data.paths=[x]")
    dump_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


def test_config_is_frozen():
    c = cfg()
    with pytest.raises(AttributeError):
        c.train.lr = 1.0  # type: ignore[misc]


def shape(**kw):
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    }
    base.update(kw)
    return ModelShape.from_hf_config(base)


def test_layout_derives_dp():
    lay = validate_layout(cfg("parallel.tensor_model_parallel_size=3").parallel, shape(), 12)
    assert (lay.tp, lay.pp, lay.cp, lay.dp) == (3, 1, 1, 4)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tensor_model_parallel_size=2"], 6, "does not divide the 9 attention heads"),
        (["parallel.pipeline_model_parallel_size=4"], 4, "does not divide the 30 layers"),
        (["parallel.pipeline_model_parallel_size=3"], 4, "not a multiple of TP\\*PP\\*CP"),
        (["parallel.expert_model_parallel_size=2"], 2, "dense model"),
    ],
)
def test_impossible_layouts(overrides, world, message):
    with pytest.raises(ValueError, match=message):
        validate_layout(cfg(*overrides).parallel, shape(), world)


def test_kv_heads_and_vpp_and_experts():
    with pytest.raises(ValueError, match="key/value heads"):
        validate_layout(
            cfg("parallel.tensor_model_parallel_size=3").parallel,
            shape(num_attention_heads=12, num_key_value_heads=4, hidden_size=768),
            3,
        )
    with pytest.raises(ValueError, match="PP\\*VPP"):
        validate_layout(
            cfg(
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=4",
            ).parallel,
            shape(),
            2,
        )
    moe = ModelShape.from_hf_config(QWEN3_30B_A3B)
    with pytest.raises(ValueError, match="does not divide the 128 experts"):
        validate_layout(cfg("parallel.expert_model_parallel_size=3").parallel, moe, 3)
    with pytest.raises(ValueError, match="experts are spread"):
        validate_layout(cfg("parallel.expert_model_parallel_size=16").parallel, moe, 8)
    lay = validate_layout(
        cfg(
            "parallel.tensor_model_parallel_size=4",
            "parallel.context_parallel_size=4",
            "parallel.expert_model_parallel_size=8",
            "parallel.expert_tensor_parallel_size=1",
        ).parallel,
        moe,
        32,
    )
    assert lay.dp == 2 and lay.expert_dp == 4


def test_lengths_fit_positions():
    c = cfg("rollout.max_prompt_length=8000", "rollout.max_response_length=1000")
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=8192"):
        validate_lengths(c, shape())
    c = cfg(
        "rollout.max_prompt_length=4000",
        "rollout.max_response_length=1000",
        "train.max_tokens_per_microbatch=2000",
    )
    with pytest.raises(ValueError, match="raise it to at least 5000"):
        validate_lengths(c, shape())


def test_memory_estimate_shrinks_with_parallelism(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    moe = ModelShape.from_hf_dir(tmp_path)
    assert 29e9 < moe.num_params() < 32e9  # Qwen3-30B-A3B has 30.5B parameters
    c1 = cfg("parallel.expert_model_parallel_size=1")
    c8 = cfg(
        "parallel.expert_model_parallel_size=8",
        "parallel.tensor_model_parallel_size=2",
        "parallel.expert_tensor_parallel_size=1",
    )
    m1 = estimate_memory_gib(c1, moe, validate_layout(c1.parallel, moe, 8))
    m8 = estimate_memory_gib(c8, moe, validate_layout(c8.parallel, moe, 8))
    assert m8["weights"] < m1["weights"] / 6
    assert m1["weights"] == pytest.approx(moe.num_params() * 2 / 1024**3, rel=1e-6)
