"""Pre-flight: every user error a run can detect before its first step, found before heavy work.

Two levels, both free of Megatron and vLLM imports and of torch.distributed initialisation:

* `plan(config)`: the config, the parallel layout for the world size and the per-GPU memory of the
  training and the rollout phase (`memory_estimate.py`; either over `parallel.device_memory_gib`
  fails, naming the knobs), from the Hugging Face `config.json` alone (planning a 64-GPU job from a
  laptop: `parallel.world_size` gives the world), and the rollout layout
  (`rollout.tensor_parallel_size` against the world and the heads).
* `dry_run(config)`: `plan` plus what only the target machine has: the converted checkpoint
  `model.load` and its metadata, every corpus file (exists, parses, has usable rows, every data
  source has a task), the tokenizer, a writable run directory, and the rules of the rollout engine
  that depend on the device.

`megatron-spell train --plan` / `--dry-run` run them; `train.run` runs `dry_run` on every rank
before it initialises torch.distributed, so a dry run and a real run can never disagree. Every
error is a ValueError (`PreflightError`) of the form `config section.field=value: problem; fix:
...`, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from megatron_spell.config import Config
from megatron_spell.data.corpus import CorpusStats, load_corpus, resolve_files
from megatron_spell.layout import (
    Layout,
    ModelShape,
    validate_layout,
    validate_lengths,
)
from megatron_spell.memory_estimate import MemoryEstimate, estimate_memory
from megatron_spell.types import DocSet

# What tools/convert_hf_to_megatron.py writes (megatron_spell/mcore/checkpoint.py, its docstring).
CKPT_TRACKER = "latest_checkpointed_iteration.txt"
CKPT_RELEASE = "release"
CKPT_HF_SUBDIR = "hf"
# ModelShape fields that decide the checkpoint's tensors (max_position_embeddings: RoPE only).
_WEIGHT_FIELDS = tuple(f.name for f in fields(ModelShape) if f.name != "max_position_embeddings")


class PreflightError(ValueError):
    """A setting that cannot run; the message names the field, the value and the fix."""


def _fail(field: str, value: Any, problem: str, fix: str) -> PreflightError:
    return PreflightError(f"config {field}={value!r}: {problem}; fix: {fix}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Plan:
    """What `train --plan` prints: the model, the validated layout and the memory per rank (GiB)."""

    shape: ModelShape
    layout: Layout
    memory: MemoryEstimate

    def summary(self) -> str:
        lay = self.layout
        return "\n".join(
            [
                f"model: {self.shape.architecture} "
                f"({self.shape.num_params() / 1e9:.2f}B parameters)",
                f"layout: world={lay.world_size} TP={lay.tp} PP={lay.pp} VPP={lay.vpp} "
                f"CP={lay.cp} DP={lay.dp} EP={lay.ep} ETP={lay.etp}",
                *self.memory.lines(),
            ]
        )


@dataclass(frozen=True)
class DryRun:
    """What `dry_run` checked and loaded; `train.run` builds the run from it (no second load)."""

    plan: Plan
    corpus: list[DocSet]
    corpus_stats: CorpusStats


# --- world size ----------------------------------------------------------------------------------


def launched_world_size() -> int:
    """The world size the launcher (torchrun, srun via the sbatch script) gives this process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_world_size(config: Config) -> int:
    """`parallel.world_size` when declared, else the launcher's (one rank without a launcher)."""
    return config.parallel.world_size or launched_world_size()


def check_launched_world(config: Config, launched: int) -> None:
    """A declared `parallel.world_size` must be the world the job was launched with."""
    declared = config.parallel.world_size
    if declared is not None and declared != launched:
        raise _fail(
            "parallel.world_size",
            declared,
            f"the launcher started {launched} ranks",
            f"launch {declared} ranks, or set parallel.world_size={launched} (or unset it)",
        )


# --- rollout -------------------------------------------------------------------------------------


def check_rollout_world(
    tp: int, world: int, *, field: str = "rollout.tensor_parallel_size"
) -> None:
    """The rollout engine's layout: its TP groups (one independent vLLM replica each) tile the world.

    The rollout engine (rollout/engine.py) runs the same check when started alone; `field` is how
    the caller spells the knob (the eval CLI's flag).
    """
    if world % tp:
        raise _fail(
            field,
            tp,
            f"does not divide the world size {world} (each group of {field} ranks hosts "
            "one vLLM replica)",
            f"use one of {_divisors(world)}",
        )


def _check_rollout_heads(tp: int, shape: ModelShape) -> None:
    """vLLM splits the query heads over its TP ranks and splits or replicates the KV heads."""
    heads, kv = shape.num_attention_heads, shape.num_kv_heads
    if heads % tp or (kv % tp and tp % kv):
        ok = [d for d in _divisors(heads) if kv % d == 0 or d % kv == 0]
        raise _fail(
            "rollout.tensor_parallel_size",
            tp,
            f"cannot split the model's {heads} attention heads and {kv} key/value heads (vLLM)",
            f"use one of {ok}",
        )


# --- plan ----------------------------------------------------------------------------------------


def _check_n_docs(config: Config) -> None:
    for key, counts in config.data.n_docs.items():
        if not counts or any(n < 1 for n in counts):
            raise _fail(
                f"data.n_docs.{key}", list(counts), "needs document counts >= 1", "e.g. [5]"
            )


def _check_routing_replay(config: Config, shape: ModelShape) -> None:
    if config.train.routing_replay and not shape.num_experts:
        raise _fail(
            "train.routing_replay",
            True,
            f"{config.model.hf_dir} is a dense model (no experts to replay)",
            "set train.routing_replay=false (routing replay is for mixture-of-experts models)",
        )


def plan(config: Config, *, world_size: int | None = None, on_gpu: bool | None = None) -> Plan:
    """Config, layout and memory from the HF config.json only (see the module docstring)."""
    world = planned_world_size(config) if world_size is None else world_size
    shape = ModelShape.from_hf_dir(config.model.hf_dir)
    layout = validate_layout(config.parallel, shape, world)
    validate_lengths(config, shape)
    tp = config.rollout.tensor_parallel_size
    check_rollout_world(tp, world)
    _check_rollout_heads(tp, shape)
    _check_n_docs(config)
    _check_routing_replay(config, shape)
    memory = estimate_memory(config, shape, layout)
    if on_gpu is not False:  # a CPU run's memory is host RAM (rollout.kv_cache_gib), not this
        try:
            memory.check()
        except ValueError as e:
            raise PreflightError(str(e)) from None
    return Plan(shape=shape, layout=layout, memory=memory)


# --- dry run -------------------------------------------------------------------------------------


def target_has_gpu() -> bool:
    """Whether this machine (the one the run uses) has CUDA; vLLM's CPU rules apply without it."""
    import torch

    return torch.cuda.is_available()


def _read_shape(path: Path, field: str, value: str) -> ModelShape:
    try:
        return ModelShape.from_hf_config(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(
            field, value, f"{path} is not a readable HF config ({exc!r})", "re-convert"
        ) from exc


_CONVERT = (
    "convert the HF weights once with `python tools/convert_hf_to_megatron.py --hf-dir HF "
    "--out-dir CKPT` and set model.load=CKPT"
)
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_cpu_kv_cache(config: Config, shape: ModelShape) -> None:
    """On CPU, vLLM's KV cache (`rollout.kv_cache_gib`) must hold one full-length sequence.

    The lower bound of vLLM's own start-up check (vllm/v1/core/kv_cache_utils.py, "To serve at least
    one request"): K and V of every layer for prompt + response tokens, the KV heads split over the
    rollout TP ranks (replicated when there are fewer heads than ranks), in the model's dtype. An
    operator-set VLLM_CPU_KVCACHE_SPACE replaces the bound (the engine lets it win): then no check.
    """
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    r = config.rollout
    tokens = r.max_prompt_length + r.max_response_length
    kv_heads = max(1, shape.num_kv_heads // r.tensor_parallel_size)
    per_token = 2 * shape.num_layers * kv_heads * shape.head_dim * _DTYPE_BYTES[config.model.dtype]
    need = tokens * per_token / 1024**3
    if need > r.kv_cache_gib:
        raise _fail(
            "rollout.kv_cache_gib",
            r.kv_cache_gib,
            f"holds less than one full sequence on CPU ({tokens} tokens of "
            "rollout.max_prompt_length + max_response_length need "
            f"{need:.2f} GiB of KV cache per rank)",
            f"set rollout.kv_cache_gib >= {need:.2f} or shorten the sequences",
        )


def check_checkpoint(load: str, shape: ModelShape) -> None:
    """`model.load` is a converted checkpoint (tools/convert_hf_to_megatron.py) of the same model.

    Reads only the layout files and the HF config the converter stores in CKPT/hf/; the fields that
    decide the weights (architecture, layers, widths, heads, vocabulary, experts, tied head) must
    equal model.hf_dir's. A bare Megatron distributed checkpoint (a directory with metadata.json)
    carries no HF config: only its presence is checked.
    """
    convert = _CONVERT
    if not load:
        raise _fail(
            "model.load", load, "is empty: training starts from a converted checkpoint", convert
        )
    root = Path(load)
    if not root.is_dir():
        raise _fail("model.load", load, "is not a directory", convert)
    if (root / "metadata.json").is_file():
        return
    tracker = root / CKPT_TRACKER
    if not tracker.is_file():
        raise _fail(
            "model.load",
            load,
            f"is not a Megatron checkpoint (no {CKPT_TRACKER}, no metadata.json)",
            convert,
        )
    it = tracker.read_text().strip()
    sub = root / (CKPT_RELEASE if it == CKPT_RELEASE else f"iter_{it.zfill(7)}")
    if not (sub / "metadata.json").is_file():
        raise _fail(
            "model.load", load, f"{sub} (named by {CKPT_TRACKER}) is missing or incomplete", convert
        )
    hf_config = root / CKPT_HF_SUBDIR / "config.json"
    if not hf_config.is_file():
        raise _fail("model.load", load, f"has no {CKPT_HF_SUBDIR}/config.json", convert)
    stored = _read_shape(hf_config, "model.load", load)
    diff = [
        f"{name}: checkpoint {getattr(stored, name)!r}, model.hf_dir {getattr(shape, name)!r}"
        for name in _WEIGHT_FIELDS
        if getattr(stored, name) != getattr(shape, name)
    ]
    if diff:
        raise _fail(
            "model.load",
            load,
            "was converted from a different model than model.hf_dir (" + "; ".join(diff) + ")",
            "point model.load and model.hf_dir at the same model, or re-convert",
        )


def check_run_dir(config: Config) -> None:
    """The run directory exists or can be created, and a file can be written in it."""
    run_dir = config.run_dir.absolute()
    value = f"{config.output_dir}/{config.run_name}"
    fix = "set output_dir to a writable directory"
    if run_dir.exists() and not run_dir.is_dir():
        raise _fail("output_dir/run_name", value, f"{run_dir} is a file", fix)
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise _fail("output_dir/run_name", value, f"{parent} is a file", fix)
    if parent != run_dir:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _fail(
                "output_dir/run_name",
                value,
                f"{run_dir} cannot be created ({parent} is read-only)",
                fix,
            )
        return
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise _fail(
            "output_dir/run_name", value, f"{run_dir} is not writable ({exc})", fix
        ) from exc


def check_tokenizer(hf_dir: str, vocab_size: int) -> None:
    """The tokenizer and its chat template (every SPELL prompt is a chat) load from model.hf_dir,
    and its token ids fit the model's embedding (`vocab_size` rows)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        raise _fail(
            "model.hf_dir",
            hf_dir,
            f"the tokenizer does not load ({type(exc).__name__}: {exc})",
            "point it at a Hugging Face model directory with its tokenizer files",
        ) from exc
    if len(tok) > vocab_size:
        raise _fail(
            "model.hf_dir",
            hf_dir,
            f"the tokenizer has {len(tok)} tokens, more than the model's vocab_size={vocab_size}",
            "use the tokenizer the model was trained with",
        )
    if not getattr(tok, "chat_template", None):
        raise _fail(
            "model.hf_dir",
            hf_dir,
            "the tokenizer has no chat template (SPELL prompts are chats)",
            "use an instruct model's directory (tokenizer_config.json with chat_template)",
        )


def check_data(config: Config, corpus: Sequence[DocSet]) -> None:
    """Every data source has a task split, and some task with rows has a positive domain weight."""
    from megatron_spell.data.curriculum import CurriculumSchedule
    from megatron_spell.data.sampler import DomainSampler, assign_tasks

    d = config.data
    rows = assign_tasks(corpus, d.tasks, random.Random(d.seed))
    DomainSampler(rows, d.domain_weights, d.gen_batch_size, seed=d.seed)
    CurriculumSchedule(
        docs_per_stage=d.curriculum_docs, steps_per_stage=d.curriculum_steps_per_stage
    )


def dry_run(
    config: Config,
    *,
    world_size: int | None = None,
    replay_dir: str | None = None,
    convert_first: bool = False,
) -> DryRun:
    """`plan` plus the target machine's files and device (see the module docstring).

    `replay_dir` (train --replay): the dumped rollouts must exist; no vLLM, so neither the tokenizer
    nor the device rule is checked. `convert_first`: model.load is converted before the run (the
    demo does it), so it is not checked.
    """
    world = planned_world_size(config) if world_size is None else world_size
    on_gpu = target_has_gpu()
    checked = plan(config, world_size=world, on_gpu=on_gpu)
    shape = checked.shape
    if replay_dir is not None and not Path(replay_dir).is_dir():
        raise PreflightError(f"--replay {replay_dir}: no such directory of dumped rollouts")
    if replay_dir is None and not on_gpu:
        check_cpu_kv_cache(config, shape)
    if not convert_first:
        check_checkpoint(config.model.load, shape)
    resolve_files(list(config.data.paths))  # every path exists before anything is parsed
    check_run_dir(config)
    if replay_dir is None:
        check_tokenizer(config.model.hf_dir, shape.vocab_size)
    corpus, stats = load_corpus(list(config.data.paths))
    check_data(config, corpus)
    return DryRun(plan=checked, corpus=corpus, corpus_stats=stats)
