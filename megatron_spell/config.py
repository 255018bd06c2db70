"""Typed, frozen run configuration: YAML presets plus `section.key=value` overrides.

This is the one config tree of a run: components take their typed section (`TrainConfig`,
`RolloutConfig`, `SpellConfig`, ...) directly, and every knob has one default and one validation
here. Defaults follow the SPELL reference scripts (docs/spell-algorithm.md §6) unless the field's
comment says otherwise. Sections are keyword-only frozen dataclasses validated at construction
(`Literal` fields included); an error names the field, the value and the fix. Unknown keys are
errors (with a "did you mean" hint), never silently ignored.

Cross-checks that need the model shape or the world size (parallel layout, sequence lengths) live in
`megatron_spell.layout`, which runs before any heavy work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
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


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field: allowed values} of a section's `Literal` fields."""
    hints = typing.get_type_hints(cls)
    return {n: typing.get_args(t) for n, t in hints.items() if typing.get_origin(t) is Literal}


def _check_literals(section: str, obj: Any) -> None:
    """Every `Literal` field holds one of its values (the one check of these fields)."""
    for name, allowed in _literal_fields(type(obj)).items():
        if getattr(obj, name) not in allowed:
            _fail(section, name, getattr(obj, name), f"must be one of {list(allowed)}")


def _check_members(section: str, name: str, values: tuple[str, ...], allowed: tuple[str, ...]):
    for value in values:
        if value not in allowed:
            _fail(section, name, value, f"must be among {allowed}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to train and how to hold it."""

    # Hugging Face model directory: config, tokenizer, and weights unless `load` is set
    hf_dir: str = ""
    # Megatron distributed checkpoint (tools/convert_hf_to_megatron.py) to start from
    load: str = ""
    # parameter dtype of the Megatron model (bf16 keeps fp32 main weights in the optimizer; fp16 is
    # refused until loss scaling exists)
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    # layer spec and core attention: "te" Transformer Engine (needs it to import, and CUDA), "local"
    # Megatron's local spec with our packed/CP attention, "auto" TE when it imports, else local
    attention_backend: Literal["auto", "local", "te"] = "auto"

    def __post_init__(self) -> None:
        _check_literals("model", self)
        if not self.hf_dir:
            _fail("model", "hf_dir", self.hf_dir, "set it to a Hugging Face model directory")
        if self.dtype == "fp16":
            _fail(
                "model",
                "dtype",
                "fp16",
                "fp16 needs loss scaling, which this trainer does not do (the update would be "
                "silently wrong); use bf16 (or fp32)",
            )


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. The data-parallel size is derived: world / (TP * PP * CP)."""

    # tensor-parallel ranks per model replica
    tensor_model_parallel_size: int = 1
    # pipeline stages per model replica
    pipeline_model_parallel_size: int = 1
    # model chunks per pipeline rank (interleaved 1F1B); None: not interleaved
    virtual_pipeline_model_parallel_size: int | None = None
    # context-parallel ranks: each holds a slice of every packed sequence
    context_parallel_size: int = 1
    # expert-parallel ranks of the MoE layers
    expert_model_parallel_size: int = 1
    # tensor-parallel ranks inside one expert; None: same as tensor_model_parallel_size
    expert_tensor_parallel_size: int | None = None
    # Megatron sequence parallelism (activations split over the TP ranks; needs TP > 1)
    sequence_parallel: bool = False
    # declared world size for --plan/--dry-run (train checks the launcher agrees); None: launcher
    world_size: int | None = None
    # memory of one GPU (GiB) that the plan's phase estimates must fit (H100-80GB: 79.6)
    device_memory_gib: float = 79.6

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
            device_memory_gib=self.device_memory_gib,
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
    """Corpus, task split, domain sampling, history memory (docs/spell-algorithm.md §2, §4)."""

    # parquet / JSONL / JSON files or directories
    paths: tuple[str, ...] = ()
    # data_source prefix (text before the first "_") -> tasks generated from those rows
    tasks: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "ultrafineweb": ("doc_general_qa", "doc_mc"),
            "docmath": ("docmath_qa",),
            "hotpotqa": ("doc_general_qa", "doc_mc"),
        }
    )
    # data_source prefix (or "default") -> documents shown to the questioner, drawn per prompt
    n_docs: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"default": (5,)})
    # task -> relative weight of its questioner prompts in a generation round
    domain_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    # questioner prompts per generation round
    gen_batch_size: int = 480
    # seed of the task split, the domain sampler and the document draws
    seed: int = 42
    # keep a history memory of earlier questions per document set (docs/spell-algorithm.md §4.1)
    use_history: bool = True
    # questions remembered per document set
    history_size: int = 3
    # memory success gate, lower end: a question is stored when lower <= responder mean <= upper
    history_lower: float = 0.01
    # memory gate, upper end. Deviation: the reference admits 1.0 (too easy); the paper gates on
    # r > 0
    history_upper: float = 0.99
    # explicit curriculum: documents shown to the questioner per stage; empty: no curriculum
    curriculum_docs: tuple[int, ...] = ()
    # steps per curriculum stage (0: no curriculum)
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
    """The self-play algorithm: batch sizes, rewards, filters (docs/spell-algorithm.md §1, §3)."""

    # distinct responder question groups per update
    train_batch_size: int = 128
    # responder samples per question (the GRPO group size)
    responder_n: int = 8
    # verifier judgements per responder answer (majority vote)
    verifier_n: int = 8
    # generation rounds before giving up on a batch
    max_num_gen_batches: int = 10
    # grounding pre-filter: drop questions answerable without the documents (bad_ground)
    filter_questioner_prompts: bool = True
    # pre-filter: a document-free answer scoring >= this makes the question bad_ground
    ground_threshold: float = 0.1
    # responder reward from the rule score and the verifier majority (Eq. 6); "rule": rule only
    reward_combine: Literal["max", "mean", "min", "sum", "rule"] = "max"
    # rule scorer of doc_general_qa answers
    doc_qa_metric: Literal["sub_em_strict", "sub_em_loose", "em", "f1"] = "sub_em_strict"
    # reference answers longer than this (tokens) make the question bad_format
    max_answer_tokens: int = 40
    # questioner reward of a good question from its group's mean responder reward (Eq. 7)
    questioner_reward: Literal["gaussian", "reverse", "rzero"] = "gaussian"
    # questioner advantage: "batch" normalises over the batch's questioner samples, "none" raw
    questioner_group: Literal["batch", "none"] = "batch"
    # train the questioner role
    update_questioner: bool = True
    # bad-case questioner samples per good one (0 disables bad cases, 1 as many bad as good)
    questioner_bad_case_ratio: float = 1.0
    # train the verifier role
    update_verifier: bool = True
    # verifier groups per update = responder trajectories * this / verifier_n
    verifier_update_ratio: float = 0.125
    # verifier training label: "maj_cons" majority agreeing with the rule score, "maj" majority
    verifier_label: Literal["maj_cons", "maj"] = "maj_cons"
    # verifier candidates need a majority share within [verifier_lower, verifier_upper]
    verifier_lower: float = 0.51
    # upper end of that share (unanimous groups teach nothing)
    verifier_upper: float = 0.99
    # tasks whose responder answers the verifier judges; the others are scored by rule only
    verifier_tasks: tuple[str, ...] = TASKS
    # when max_num_gen_batches rounds gave too few groups: "error" (the reference), or
    # "train_available" (train on the groups there are; logged as batch/shortfall)
    on_batch_shortfall: Literal["error", "train_available"] = "error"

    def __post_init__(self) -> None:
        _check_literals("spell", self)
        _positive(
            "spell",
            train_batch_size=self.train_batch_size,
            responder_n=self.responder_n,
            verifier_n=self.verifier_n,
            max_num_gen_batches=self.max_num_gen_batches,
        )
        if self.responder_n < 2:
            _fail("spell", "responder_n", self.responder_n, "GRPO needs >= 2 samples per question")
        if self.questioner_bad_case_ratio < 0:
            _fail(
                "spell",
                "questioner_bad_case_ratio",
                self.questioner_bad_case_ratio,
                "must be >= 0 (0 disables bad cases, 1 = as many bad as good)",
            )
        if not 0.0 <= self.verifier_update_ratio <= 1.0:
            _fail("spell", "verifier_update_ratio", self.verifier_update_ratio, "must be in [0, 1]")
        _check_members("spell", "verifier_tasks", self.verifier_tasks, TASKS)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """vLLM generation, shared by the three roles (docs/spell-algorithm.md §6)."""

    # sampling temperature; the train step takes log-probs of softmax(logits / temperature) too
    temperature: float = 0.7
    # nucleus sampling mass
    top_p: float = 0.95
    # top-k sampling; <= 0 disables it
    top_k: int = -1
    # prompts longer than this (tokens) are excluded from generation and counted
    max_prompt_length: int = 18000
    # most tokens generated per response
    max_response_length: int = 4096
    # vLLM tensor-parallel size; the other ranks form vLLM data-parallel replicas
    tensor_parallel_size: int = 1
    # GPU only: fraction of GPU memory vLLM may take
    gpu_memory_utilization: float = 0.6
    # GPU only: vLLM sleep mode while Megatron trains: 2 frees the KV cache and drops the weights
    # (the sync brings new ones), 1 keeps a host copy of the weights, 0 stays resident
    sleep_level: int = 2
    # CPU only: bound on the KV cache (GiB)
    kv_cache_gib: float = 1.0
    # vLLM automatic prefix caching (the three roles share long document prefixes)
    enable_prefix_caching: bool = True
    # vLLM scheduler token budget per step (raised to prompt + response length); None: vLLM's
    # default
    max_num_batched_tokens: int | None = 32000
    # log-probs vLLM returns: of the sampling distribution (after temperature, top-p/k) or raw
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    # size of one weight-sync bucket Megatron -> vLLM (MB)
    weight_sync_bucket_mb: int = 512
    # vLLM engine seed (plus the rollout data-parallel rank)
    seed: int = 0
    # roles whose outputs are constrained to the formats of docs/spell-algorithm.md §2.3 (vLLM
    # structured outputs). A deviation for small models that cannot follow the formats yet (see
    # spell/schemas.py); empty, as in the reference, by default
    structured_outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_literals("rollout", self)
        _positive(
            "rollout",
            temperature=self.temperature,
            max_prompt_length=self.max_prompt_length,
            max_response_length=self.max_response_length,
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_gib=self.kv_cache_gib,
            max_num_batched_tokens=self.max_num_batched_tokens,
            weight_sync_bucket_mb=self.weight_sync_bucket_mb,
        )
        if not 0.0 < self.top_p <= 1.0:
            _fail("rollout", "top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            _fail(
                "rollout",
                "gpu_memory_utilization",
                self.gpu_memory_utilization,
                "must be in (0, 1]",
            )
        _check_members("rollout", "structured_outputs", self.structured_outputs, ROLES)
        if self.sleep_level not in (0, 1, 2):
            _fail("rollout", "sleep_level", self.sleep_level, "must be 0, 1 or 2")

    @property
    def max_model_len(self) -> int:
        """Longest sequence the engine holds: prompt plus response."""
        return self.max_prompt_length + self.max_response_length


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Policy update: optimizer, policy loss, micro-batching (docs/spell-algorithm.md §5)."""

    # peak learning rate (constant by default, as the reference)
    lr: float = 2e-6
    # PPO old log-probs: False takes them from the training pass itself (the batch is on-policy:
    # one optimizer step per batch, docs/spell-algorithm.md §1.7), True recomputes them in a
    # forward-only pass first (as the reference does)
    recompute_old_logprobs: bool = False
    # learning rate at the end of a cosine schedule
    min_lr: float = 0.0
    # learning-rate schedule after the warm-up
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # linear warm-up steps from 0 to lr
    lr_warmup_steps: int = 0
    # AdamW weight decay (Megatron's rule: biases and 1-D params such as norms are not decayed)
    weight_decay: float = 0.01
    # Adam beta1
    adam_beta1: float = 0.9
    # Adam beta2
    adam_beta2: float = 0.999
    # Adam epsilon
    adam_eps: float = 1e-8
    # gradient clipping by global norm; 0 disables it
    grad_clip: float = 1.0
    # policy loss, by name (mcore/loss.py POLICY_LOSSES): "grpo" PPO clip with dual clip
    loss: Literal["grpo"] = "grpo"
    # PPO ratio clip below 1: ratio >= 1 - clip_ratio_low
    clip_ratio_low: float = 0.2
    # PPO ratio clip above 1: ratio <= 1 + clip_ratio_high
    clip_ratio_high: float = 0.2
    # dual-clip bound for negative advantages (loss <= -A * clip_ratio_c); must be > 1
    clip_ratio_c: float = 3.0
    # KL penalty to a reference model; must be 0 (no reference model is kept,
    # docs/spell-algorithm.md D10)
    kl_coef: float = 0.0
    # KL estimator of that penalty: k3 "low_var_kl", k1 "kl", k2 "mse"
    kl_loss_type: Literal["low_var_kl", "kl", "mse"] = "low_var_kl"
    # entropy bonus coefficient
    entropy_coef: float = 0.0
    # loss mean over all response tokens of the global batch, or over its sequences
    loss_agg_mode: Literal["token_mean", "seq_mean"] = "token_mean"
    # padded tokens per CP rank in one micro-batch of the update
    max_tokens_per_microbatch: int = 32000
    # pack trajectories with identical prompts (a responder group, a verifier group's votes) with
    # the prompt once: each response attends to the prompt and to itself only, with its own
    # positions; same loss, gradients and log-probs as separate sequences, P + n*R tokens instead
    # of n*(P + R). Needs our attention (with Transformer Engine's it packs unshared, logged)
    shared_prefix: bool = True
    # tokens per chunk of the vocab-parallel log-prob pass
    logprob_chunk_size: int = 4096
    # Megatron's DistributedOptimizer (optimizer state sharded over DP; ignored on CPU)
    use_distributed_optimizer: bool = True
    # --- what leaves the GPU while vLLM generates (verl's grad/optimizer/param_offload; loop.py
    # "One step on one device"); on CPU only the grad free does anything ---
    # free the DDP grad buffer after the step (grads are spent) and re-allocate it for the next
    offload_grads: bool = True
    # copy the optimizer state (Adam moments, fp32 main params) to host and back for the update
    offload_optimizer: bool = False
    # copy the bf16 parameters to host after the weight sync and back for the update
    offload_params: bool = False
    # activation recomputation in the update: none, full (every layer) or selective
    recompute: Literal["none", "full", "selective"] = "full"
    # optimizer steps of the run (also the length of a cosine schedule)
    total_steps: int = 1000
    # seed of the model's random init and of the step's sampling RNGs
    seed: int = 1234

    # --- rollout correction: train/rollout importance weights (verl's names; all off by default;
    # mcore/rollout_correction.py, docs/spell-algorithm.md §5). Levels: "token", "sequence" (product
    # of the token ratios), "geometric" (their geometric mean); a band is [low, high].
    # importance weight pi_train / pi_rollout multiplying the PG loss, at this level; null: none
    rollout_is: str | None = None
    # truncation (TIS) of that weight: an upper bound, or [low, high]
    rollout_is_threshold: float | tuple[float, ...] | str = 2.0
    # masking (MIS): drop a token ("token") or a whole sequence whose ratio at this level lies
    # outside rollout_rs_threshold; null: none
    rollout_rs: str | None = None
    # band of that mask: [low, high], or an upper bound u for [1/u, u]
    rollout_rs_threshold: float | tuple[float, ...] | str | None = None
    # drop a whole sequence when any of its tokens has a ratio below this (e.g. 1e-4); null: off
    rollout_token_veto_threshold: float | None = None

    # --- MoE routing replay (R3) ---
    # vLLM returns the experts it routed every token to and the update's forward replays them
    # (Megatron-Core router replay), so training uses the rollout's expert choice. MoE models only
    # (preflight rejects it for a dense model); off by default (docs/architecture.md "Routing
    # replay")
    routing_replay: bool = False

    @property
    def rollout_is_band(self) -> tuple[float | None, float]:
        """(low or None, high) of `rollout_is_threshold`."""
        return _band("rollout_is_threshold", self.rollout_is_threshold, reciprocal=False)

    @property
    def rollout_rs_band(self) -> tuple[float | None, float]:
        """(low, high) of `rollout_rs_threshold` (an upper bound u alone means [1/u, u])."""
        return _band("rollout_rs_threshold", self.rollout_rs_threshold, reciprocal=True)

    def _check_rollout_correction(self) -> None:
        levels = ("token", "sequence", "geometric")
        for name in ("rollout_is", "rollout_rs"):
            if getattr(self, name) not in (None, *levels):
                _fail("train", name, getattr(self, name), f"must be null or one of {list(levels)}")
        if self.rollout_is is not None:
            self.rollout_is_band  # noqa: B018 (validates)
        if self.rollout_rs is not None:
            if self.rollout_rs_threshold is None:
                _fail(
                    "train",
                    "rollout_rs_threshold",
                    None,
                    "train.rollout_rs needs a band: set train.rollout_rs_threshold=[low, high]",
                )
            self.rollout_rs_band  # noqa: B018
        veto = self.rollout_token_veto_threshold
        if veto is not None and not 0.0 < veto < 1.0:
            _fail(
                "train",
                "rollout_token_veto_threshold",
                veto,
                "must be in (0, 1): a sequence with a token ratio below it is dropped (e.g. 1e-4)",
            )
        if self.rollout_correction_on and self.recompute_old_logprobs:
            _fail(
                "train",
                "recompute_old_logprobs",
                True,
                "the rollout correction reads vLLM's log-probs inside the training pass; "
                "set train.recompute_old_logprobs=false (same old log-probs) or turn the "
                "correction off",
            )

    @property
    def rollout_correction_on(self) -> bool:
        """Any of the rollout correction's weights, masks or veto is configured."""
        return (
            bool(self.rollout_is or self.rollout_rs)
            or self.rollout_token_veto_threshold is not None
        )

    def __post_init__(self) -> None:
        _check_literals("train", self)
        self._check_rollout_correction()
        _positive(
            "train",
            lr=self.lr,
            max_tokens_per_microbatch=self.max_tokens_per_microbatch,
            logprob_chunk_size=self.logprob_chunk_size,
            total_steps=self.total_steps,
        )
        if self.clip_ratio_c <= 1.0:
            _fail("train", "clip_ratio_c", self.clip_ratio_c, "dual-clip bound must be > 1")
        if self.kl_coef != 0.0:
            _fail(
                "train",
                "kl_coef",
                self.kl_coef,
                "a KL penalty needs a reference model, which is not kept (the reference runs "
                "with kl_coef=0); set train.kl_coef=0",
            )


def _band(name: str, value: Any, *, reciprocal: bool) -> tuple[float | None, float]:
    """(low, high) of a rollout-correction threshold: a float upper bound or a [low, high] pair."""
    if isinstance(value, str):
        _fail(
            "train",
            name,
            value,
            "write a band as a list, [low, high] (verl's 'low_high' string); note that a verl "
            "IS band masks outside it (IcePop): here that is train.rollout_rs=token with that band",
        )
    if isinstance(value, tuple):
        if len(value) != 2 or not 0.0 < value[0] < value[1]:
            _fail("train", name, list(value), "a band is [low, high] with 0 < low < high")
        return float(value[0]), float(value[1])
    if value is None or not value > 0.0:
        _fail("train", name, value, "must be > 0 (an upper bound) or a [low, high] band")
    return (1.0 / value if reciprocal else None), float(value)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often the whole RL state is saved."""

    # steps between saves; 0 disables periodic saves (a final and a SIGTERM save still happen)
    save_interval: int = 10
    # checkpoints kept (older ones are deleted)
    keep_last: int = 2
    # "auto" resumes from the run directory's latest checkpoint, "never" starts fresh
    resume: Literal["auto", "never"] = "auto"
    # at the end of training also write the final weights as a Hugging Face directory, <run_dir>/hf/
    # (what `megatron-spell export RUN_DIR` makes from any checkpoint of the run)
    export_hf: bool = False

    def __post_init__(self) -> None:
        _check_literals("checkpoint", self)
        _positive("checkpoint", keep_last=self.keep_last)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Metrics sinks and rollout dumps (metrics are written every step)."""

    # write TensorBoard event files
    tensorboard: bool = True
    # write metrics.jsonl
    jsonl: bool = True
    # write every phase's records as JSONL per step (for replay)
    dump_rollouts: bool = False


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole run. `output_dir/run_name` holds config, logs, checkpoints and rollout dumps."""

    # name of the run directory
    run_name: str = "spell"
    # parent of the run directory
    output_dir: str = "runs"
    # model to train (required)
    model: ModelConfig
    # Megatron parallel layout
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # corpus, tasks, sampling and history memory
    data: DataConfig = field(default_factory=DataConfig)
    # the self-play algorithm
    spell: SpellConfig = field(default_factory=SpellConfig)
    # vLLM generation
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # policy update
    train: TrainConfig = field(default_factory=TrainConfig)
    # checkpoints
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # metrics and dumps
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.train.rollout_correction_on and self.rollout.structured_outputs:
            _fail(
                "rollout",
                "structured_outputs",
                list(self.rollout.structured_outputs),
                "vLLM reports the log-probs of the constrained (masked, renormalised) "
                "distribution for those roles, not the policy's, so the rollout correction "
                "would weight their tokens by pi / pi_masked; set "
                "rollout.structured_outputs=[] or turn the correction off "
                "(train.rollout_is / rollout_rs / rollout_token_veto_threshold)",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


# -------------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides


# keys of earlier versions -> their names now (for the config.yaml saved by an older run)
RENAMED = {"spell.tasks": "spell.verifier_tasks"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ValueError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:  # checked by the section (_check_literals)
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
            if path in RENAMED:
                hint = f"; it is now {RENAMED[path]!r}"
            raise ValueError(f"unknown config key {path!r}{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=c` into (["a", "b"], value); the value is parsed as YAML (1e-6, true, [1,2])."""
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
    """Read a YAML preset (optional), apply `section.key=value` overrides, validate; a Config."""
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
