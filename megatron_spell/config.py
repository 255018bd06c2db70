"""Typed, frozen run configuration: YAML presets plus `section.key=value` overrides.

Every field has a default taken from the SPELL reference scripts (spell-algorithm.md section 6) unless the
comment says otherwise. Sections are keyword-only frozen dataclasses validated at construction; an error names the
field, the value and the fix. Unknown keys are errors (with a "did you mean" hint), never silently ignored.

Cross-checks that need the model shape or the world size (parallel layout, sequence lengths) live in
`megatron_spell.layout`, which runs before any heavy work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_spell.types import Role, Task

TASKS = tuple(t.value for t in Task)
ROLES = tuple(r.value for r in Role)


def _fail(section: str, name: str, value: Any, fix: str) -> None:
    raise ValueError(f"config {section}.{name}={value!r}: {fix}")


def _positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            _fail(section, name, value, "must be > 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to train and how to hold it."""

    hf_dir: str = (
        ""  # Hugging Face model directory: config, tokenizer, and weights unless `load` is set
    )
    load: str = (
        ""  # Megatron distributed checkpoint (tools/convert_hf_to_megatron.py) to start from
    )
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    attention_backend: Literal["auto", "local", "te"] = (
        "auto"  # auto: Transformer Engine if it imports
    )

    def __post_init__(self) -> None:
        if not self.hf_dir:
            _fail("model", "hf_dir", self.hf_dir, "set it to a Hugging Face model directory")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. The data-parallel size is derived: world / (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = (
        None  # model chunks per pipeline rank (interleaved 1F1B)
    )
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None  # None: same as tensor_model_parallel_size
    sequence_parallel: bool = False
    world_size: int | None = None  # declared world size for --dry-run; None: from the launcher

    def __post_init__(self) -> None:
        _positive(
            "parallel",
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
            world_size=self.world_size,
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            _fail(
                "parallel",
                "sequence_parallel",
                True,
                "sequence parallelism needs tensor_model_parallel_size > 1; set it to false",
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size == 1:
            _fail(
                "parallel",
                "virtual_pipeline_model_parallel_size",
                vpp,
                "interleaving needs pipeline_model_parallel_size > 1; unset it",
            )

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one full copy of the model (TP x PP x CP)."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Corpus, task split, domain sampling and the history memory (spec sections 2, 4)."""

    paths: tuple[str, ...] = ()  # parquet / JSONL / JSON files or directories
    # data_source prefix (text before the first "_") -> tasks generated from those rows
    tasks: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "ultrafineweb": ("doc_general_qa", "doc_mc"),
            "docmath": ("docmath_qa",),
            "hotpotqa": ("doc_general_qa", "doc_mc"),
        }
    )
    n_docs: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"default": (5,)})
    domain_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    gen_batch_size: int = 480  # questioner prompts per generation round
    seed: int = 42
    # history memory (spec 4.1); success gate: lower <= responder mean <= upper
    use_history: bool = True
    history_size: int = 3
    history_lower: float = 0.01
    history_upper: float = (
        0.99  # deviation: the reference admits 1.0 (too easy); the paper gates on r^que > 0
    )
    # optional explicit curriculum: documents shown to the questioner per stage, stage advances every N steps
    curriculum_docs: tuple[int, ...] = ()
    curriculum_steps_per_stage: int = 0

    def __post_init__(self) -> None:
        _positive("data", gen_batch_size=self.gen_batch_size, history_size=self.history_size)
        for src, tasks in self.tasks.items():
            for task in tasks:
                if task not in TASKS:
                    _fail("data", f"tasks.{src}", task, f"tasks must be among {TASKS}")
        for task in self.domain_weights:
            if task not in TASKS:
                _fail("data", "domain_weights", task, f"keys must be among {TASKS}")
        if not 0.0 <= self.history_lower <= self.history_upper <= 1.0:
            _fail(
                "data",
                "history_lower/history_upper",
                (self.history_lower, self.history_upper),
                "need 0 <= history_lower <= history_upper <= 1",
            )


@dataclass(frozen=True, kw_only=True)
class SpellConfig:
    """The self-play algorithm: batch sizes, rewards, filters (spec sections 1, 3)."""

    train_batch_size: int = 128  # distinct responder question groups per update
    responder_n: int = 8
    verifier_n: int = 8
    max_num_gen_batches: int = 10  # generation rounds before giving up on a batch
    filter_questioner_prompts: bool = True  # grounding pre-filter (bad_ground)
    ground_threshold: float = 0.1
    reward_combine: Literal["max", "mean", "min", "sum", "rule"] = "max"
    doc_qa_metric: Literal["sub_em_strict", "sub_em_loose", "em", "f1"] = "sub_em_strict"
    max_answer_tokens: int = 40
    questioner_reward: Literal["gaussian", "reverse", "rzero"] = "gaussian"
    questioner_group: Literal["batch", "none"] = "batch"
    update_questioner: bool = True
    questioner_bad_case_ratio: float = 1.0
    update_verifier: bool = True
    verifier_update_ratio: float = 0.125
    verifier_label: Literal["maj_cons", "maj"] = "maj_cons"
    verifier_lower: float = 0.51
    verifier_upper: float = 0.99
    tasks: tuple[str, ...] = TASKS
    # what a step does when max_num_gen_batches rounds gave fewer than train_batch_size groups:
    # "error" (the reference) or "train_available" (train on the groups there are; logged as batch/shortfall)
    on_batch_shortfall: Literal["error", "train_available"] = "error"

    def __post_init__(self) -> None:
        _positive(
            "spell",
            train_batch_size=self.train_batch_size,
            responder_n=self.responder_n,
            verifier_n=self.verifier_n,
            max_num_gen_batches=self.max_num_gen_batches,
        )
        if self.responder_n < 2:
            _fail("spell", "responder_n", self.responder_n, "GRPO needs >= 2 samples per question")
        for task in self.tasks:
            if task not in TASKS:
                _fail("spell", "tasks", task, f"must be among {TASKS}")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """vLLM generation, shared by the three roles (spec section 6)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1
    max_prompt_length: int = 18000
    max_response_length: int = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    kv_cache_gib: float = 1.0  # CPU only: bound on the KV cache
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 32000
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    weight_sync_bucket_mb: int = 512
    seed: int = 0
    # roles whose outputs are constrained to the spec's formats (vLLM structured outputs): any of questioner,
    # responder, verifier. A deviation for small models that cannot follow the formats yet (see
    # megatron_spell/spell/schemas.py). Empty, as in the reference, by default.
    structured_outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive(
            "rollout",
            temperature=self.temperature,
            max_prompt_length=self.max_prompt_length,
            max_response_length=self.max_response_length,
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_gib=self.kv_cache_gib,
            weight_sync_bucket_mb=self.weight_sync_bucket_mb,
        )
        if not 0.0 < self.top_p <= 1.0:
            _fail("rollout", "top_p", self.top_p, "must be in (0, 1]")
        for role in self.structured_outputs:
            if role not in ROLES:
                _fail("rollout", "structured_outputs", role, f"roles must be among {ROLES}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Policy update: optimizer, GRPO loss, micro-batching (spec section 5)."""

    lr: float = 2e-6
    # PPO old log-probs: False takes them from the training pass itself (the batch is on-policy: one optimizer
    # step per batch, spec 1.7), True recomputes them in a forward-only pass first, as the reference does
    recompute_old_logprobs: bool = False
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    kl_coef: float = 0.0
    kl_loss_type: Literal["low_var_kl", "kl", "mse"] = "low_var_kl"
    entropy_coef: float = 0.0
    loss_agg_mode: Literal["token_mean", "seq_mean"] = "token_mean"
    max_tokens_per_microbatch: int = 32000
    logprob_chunk_size: int = 4096  # tokens per chunk of the vocab-parallel logprob pass
    use_distributed_optimizer: bool = True
    recompute: Literal["none", "full", "selective"] = "full"
    total_steps: int = 1000
    seed: int = 1234

    def __post_init__(self) -> None:
        _positive(
            "train",
            lr=self.lr,
            max_tokens_per_microbatch=self.max_tokens_per_microbatch,
            logprob_chunk_size=self.logprob_chunk_size,
            total_steps=self.total_steps,
        )
        if self.clip_ratio_c <= 1.0:
            _fail("train", "clip_ratio_c", self.clip_ratio_c, "dual-clip bound must be > 1")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often the whole RL state is saved."""

    save_interval: int = (
        10  # steps; 0 disables periodic saves (a final and a SIGTERM save still happen)
    )
    keep_last: int = 2
    resume: Literal["auto", "never"] = "auto"

    def __post_init__(self) -> None:
        _positive("checkpoint", keep_last=self.keep_last)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Metrics sinks and rollout dumps."""

    tensorboard: bool = True
    jsonl: bool = True
    log_interval: int = 1
    dump_rollouts: bool = False  # write every phase's records as JSONL per step (for replay)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole run. `output_dir/run_name` holds config, logs, checkpoints and rollout dumps."""

    run_name: str = "spell"
    output_dir: str = "runs"
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    spell: SpellConfig = field(default_factory=SpellConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


# ---------------------------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ValueError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config {where}={value!r}: must be one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"config {where}={value!r}: bad value")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {where}={value!r}: expected a list")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {where}={value!r}: expected a mapping")
        kt, vt = args
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config {where}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {where}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config {where}={value!r}: expected a string")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(
                f"config {where}={value!r}: expected a mapping of {tp.__name__} fields"
            )
        return _build(tp, value, where)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {path!r}{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=c` into (["a", "b"], value); the value is parsed as YAML (so 1e-6, true, [1,2] work)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _merge(base: dict[str, Any], parts: list[str], value: Any) -> None:
    node = base
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {'.'.join(parts)}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML preset (optional), apply `section.key=value` overrides, validate, return a Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r}: top level must be a mapping")
        raw = loaded
    for item in overrides:
        parts, value = parse_override(item)
        _merge(raw, parts, value)
    if "model" not in raw:
        raise ValueError("config: the model section is required (set model.hf_dir=...)")
    return _build(Config, raw)


def to_dict(config: Any) -> Any:
    """Plain, JSON/YAML-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_config(config: Config, path: str | Path) -> None:
    """Save the resolved config (YAML) so that a run can be reproduced with `--config path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def format_config(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2)
