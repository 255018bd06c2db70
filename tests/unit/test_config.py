"""Config loading: types, overrides, unknown keys, validation messages; layout checks; the tree."""

import ast
import io
import json
import tokenize
from pathlib import Path

import pytest

import megatron_spell
from megatron_spell.config import Config, dump_config, load_config, parse_override
from megatron_spell.layout import ModelShape, validate_layout, validate_lengths
from megatron_spell.memory_estimate import estimate_memory

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
        (
            "spell.tasks=[doc_mc]",
            "unknown config key 'spell.tasks'; it is now 'spell.verifier_tasks'",
        ),
        ("spell.verifier_tasks=[doc_qa]", "spell.verifier_tasks='doc_qa': must be among"),
        ("logging.log_interval=5", "unknown config key 'logging.log_interval'"),
        ("train.kl_coef=0.1", "train.kl_coef=0.1: a KL penalty needs a reference model"),
        ("train.loss=gspo", "train.loss='gspo': must be one of ['grpo']"),
        ("rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization=0.0: must be in"),
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
    m1 = estimate_memory(c1, moe, validate_layout(c1.parallel, moe, 8)).train
    m8 = estimate_memory(c8, moe, validate_layout(c8.parallel, moe, 8)).train
    assert m8["weights"] < m1["weights"] / 6
    assert m1["weights"] == pytest.approx(moe.num_params() * 2 / 1024**3, rel=1e-6)
    assert m1["grads_fp32"] == pytest.approx(2 * m1["weights"])  # fp32 grads of bf16 weights


def test_memory_estimate_by_hand_for_a_dense_model():
    """Every item of both phases against a hand computation (bf16, TP=2 + SP, DP=2, 4 GPUs)."""
    shape = ModelShape(
        model_type="llama",
        architecture="LlamaForCausalLM",
        num_layers=4,
        hidden_size=1024,
        num_attention_heads=8,
        num_kv_heads=8,
        head_dim=128,
        ffn_hidden_size=4096,
        vocab_size=32000,
        max_position_embeddings=8192,
    )
    overrides = (
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "train.max_tokens_per_microbatch=8192",
        "train.logprob_chunk_size=1024",
        "train.recompute=full",
        "rollout.gpu_memory_utilization=0.5",
        "parallel.device_memory_gib=80",
    )
    c = cfg(*overrides)
    est = estimate_memory(c, shape, validate_layout(c.parallel, shape, 4))
    g = 1024**3
    local = shape.num_params() / 2  # over TP=2
    layer_input = 8192 / 2 * 1024 * 2  # tokens per SP slice x hidden x bf16
    expected_train = {
        "weights": local * 2 / g,
        "grads_fp32": local * 4 / g,
        "optimizer": local * 12 / 2 / g,  # master + 2 moments, sharded over DP=2
        "activations": (4 * layer_input + 16 * layer_input) / g,
        "logprob_chunk": 1024 * 32000 / 2 * 4 * 3 / g,
        "vllm_asleep": 1.0,
        "overhead": 3.0,
    }
    expected_rollout = {
        "vllm": 40.0,
        "megatron_weights": local * 2 / g,
        "megatron_grads": 0.0,  # train.offload_grads (default): the buffer is freed
        "megatron_optimizer": local * 6 / g,
        "overhead": 3.0,
    }
    for got, want in ((dict(est.train), expected_train), (dict(est.rollout), expected_rollout)):
        assert got.pop("total") == pytest.approx(sum(want.values()))
        assert got == pytest.approx(want)
    est.check()
    c = cfg(*overrides, "rollout.sleep_level=0")
    resident = estimate_memory(c, shape, validate_layout(c.parallel, shape, 4))
    assert resident.train["vllm_asleep"] == 40.0  # a resident engine keeps its whole share


def test_memory_check_names_the_knobs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    moe = ModelShape.from_hf_dir(tmp_path)
    base = (  # the 100K preset's layout on 64 GPUs
        "parallel.tensor_model_parallel_size=4",
        "parallel.sequence_parallel=true",
        "parallel.context_parallel_size=8",
        "parallel.expert_model_parallel_size=8",
        "parallel.expert_tensor_parallel_size=1",
        "rollout.gpu_memory_utilization=0.5",
        "train.max_tokens_per_microbatch=110000",
    )

    def check(*overrides):
        c = cfg(*base, *overrides)
        estimate_memory(c, moe, validate_layout(c.parallel, moe, 64)).check()

    check()
    with pytest.raises(ValueError, match=r"rollout phase.*lower rollout.gpu_memory_utilization"):
        check("rollout.gpu_memory_utilization=0.9")
    check("rollout.gpu_memory_utilization=0.75")
    with pytest.raises(ValueError, match=r"rollout phase.*train.offload_grads"):
        check("rollout.gpu_memory_utilization=0.75", "train.offload_grads=false")
    with pytest.raises(ValueError, match=r"training phase.*rollout.sleep_level"):
        check("rollout.sleep_level=0")  # vLLM's 39.8 GiB stay through the update
    with pytest.raises(ValueError, match=r"training phase.*train.max_tokens_per_microbatch"):
        check("train.recompute=none")


# -------------------------------------------------------------------------------------------------
# Structure of the config tree: every field documented, no dataclass elsewhere restating a section

_PACKAGE = Path(megatron_spell.__file__).parent
_CONFIG_SOURCE = _PACKAGE / "config.py"


def _section_classes(tree: ast.Module) -> list[ast.ClassDef]:
    return [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]


def _annotated_fields(cls: ast.ClassDef) -> dict[str, str]:
    """{field name: annotation source} of a class body's annotated assignments."""
    return {
        n.target.id: ast.unparse(n.annotation)
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def undocumented_fields(source: str) -> list[str]:
    """Fields of config.py's sections without a doc (a comment line right above, or a docstring).

    A comment trailing the field does not count (ruff format moves it into the value's parentheses).
    """
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.start[1]
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    missing = []
    for cls in _section_classes(ast.parse(source)):
        body = cls.body
        for i, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above = node.lineno - 1
            own_line_comment = above in comments and not lines[above - 1][: comments[above]].strip()
            nxt = body[i + 1] if i + 1 < len(body) else None
            docstring = (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            )
            trailing = any(line in comments for line in range(node.lineno, node.end_lineno + 1))
            if not (own_line_comment or docstring) or trailing:
                missing.append(f"{cls.name}.{node.target.id} (line {node.lineno})")
    return missing


def test_every_config_field_has_a_doc():
    assert undocumented_fields(_CONFIG_SOURCE.read_text()) == []


def test_doc_check_catches_a_missing_or_trailing_doc():
    source = (
        "class XConfig:\n"
        "    # documented\n"
        "    a: int = 1\n"
        "    b: int = 2\n"
        "    c: str = (\n"
        '        ""  # mangled by the formatter\n'
        "    )\n"
        "    d: int = 3\n"
        '    """documented too"""\n'
    )
    assert undocumented_fields(source) == ["XConfig.b (line 4)", "XConfig.c (line 5)"]


def test_config_source_fits_the_formatter_width():
    long = [
        i for i, line in enumerate(_CONFIG_SOURCE.read_text().splitlines(), 1) if len(line) > 100
    ]
    assert long == []


# Dataclasses that may share fields with a config section, and why.
MIRROR_EXCEPTIONS = {
    # `megatron-spell eval` has no run config: its protocol settings are its own flags
    # (docs/spell-algorithm.md §8.1)
    "megatron_spell/eval/protocol.py:EvalSettings",
}


def config_mirrors(package: Path) -> list[str]:
    """Classes outside config.py sharing >= 2 fields (same name and annotation) with one section."""
    sections = {
        cls.name: _annotated_fields(cls)
        for cls in _section_classes(ast.parse((package / "config.py").read_text()))
    }
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            fields = _annotated_fields(node)
            for section, section_fields in sections.items():
                shared = sorted(n for n, t in fields.items() if section_fields.get(n) == t)
                if len(shared) >= 2:
                    where = f"{path.relative_to(package.parent).as_posix()}:{node.name}"
                    found.append(f"{where} restates {section} {shared}")
    return found


def test_no_class_outside_config_restates_a_section():
    found = config_mirrors(_PACKAGE)
    assert [m for m in found if m.split(" ")[0] not in MIRROR_EXCEPTIONS] == []
    stale = MIRROR_EXCEPTIONS - {m.split(" ")[0] for m in found}
    assert not stale, f"no longer restate a section, remove from MIRROR_EXCEPTIONS: {stale}"


def test_mirror_check_catches_a_restated_section(tmp_path):
    (tmp_path / "config.py").write_text(_CONFIG_SOURCE.read_text())
    (tmp_path / "engine.py").write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Knobs:\n    lr: float = 1.0\n    grad_clip: float = 1.0\n"
        "    name: str = ''\n"
    )
    assert config_mirrors(tmp_path) == [
        f"{tmp_path.name}/engine.py:Knobs restates TrainConfig ['grad_clip', 'lr']"
    ]


def test_fp16_is_refused_until_loss_scaling_exists():
    with pytest.raises(ValueError, match=r"model.dtype='fp16'.*loss scaling.*use bf16"):
        load_config(None, ["model.hf_dir=/m", "model.dtype=fp16"])
