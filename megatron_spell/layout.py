"""Parallel-layout and sequence-length checks that run before any heavy work (docs/architecture.md,
"Rules").

`ModelShape` is read from the Hugging Face `config.json` alone (no torch, no weights), so
`train --plan` can validate a 30B layout on a laptop (megatron_spell/preflight.py runs these
checks). Every error names the config field, the value and a fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_spell.config import Config, ParallelConfig
from megatron_spell.families import family_of, tied_embeddings


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that decide which parallel layouts are possible."""

    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    num_experts: int = 0  # 0: dense
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """The shape of a parsed config.json; ValueError if no registered family supports it."""
        family = family_of(cfg)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        return cls(
            model_type=str(cfg.get("model_type", "")),
            architecture=str(archs[0]),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(cfg.get("intermediate_size", 0)),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 0)),
            num_experts=family.num_experts(cfg),
            moe_ffn_hidden_size=family.moe_ffn_hidden_size(cfg),
            moe_topk=family.moe_topk(cfg),
            tie_word_embeddings=tied_embeddings(cfg),
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> ModelShape:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"model.hf_dir={str(hf_dir)!r}: no config.json there; point it at a Hugging Face model "
                "directory (tools/convert_megatron_to_hf.py writes one)"
            )
        try:
            return cls.from_hf_config(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:  # bad JSON, a missing or mistyped field
            raise ValueError(
                f"model.hf_dir={str(hf_dir)!r}: {path} is not a usable HF model config ({exc!r}); "
                "point it at a Hugging Face model directory"
            ) from exc

    def num_params(self) -> int:
        """Parameter count (embeddings included once per tied/untied copy)."""
        attn = (
            self.hidden_size
            * self.head_dim
            * (self.num_attention_heads * 2 + self.num_kv_heads * 2)
        )
        if self.num_experts:
            mlp = self.num_experts * 3 * self.hidden_size * self.moe_ffn_hidden_size
            mlp += self.hidden_size * self.num_experts  # router
        else:
            mlp = 3 * self.hidden_size * self.ffn_hidden_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + emb


@dataclass(frozen=True)
class Layout:
    """A validated layout: the given sizes plus the derived data-parallel size."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    etp: int
    vpp: int

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.pp * self.ep * self.etp)


def _err(field: str, value: Any, problem: str, fix: str) -> ValueError:
    return ValueError(f"parallel layout: {field}={value} {problem}; fix: {fix}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_layout(parallel: ParallelConfig, shape: ModelShape, world_size: int) -> Layout:
    """Check that `parallel` can run `shape` on `world_size` ranks; return the derived layout."""
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    if shape.num_attention_heads % tp:
        raise _err(
            "parallel.tensor_model_parallel_size",
            tp,
            f"does not divide the {shape.num_attention_heads} attention heads",
            f"use one of {[d for d in _divisors(shape.num_attention_heads) if shape.num_kv_heads % d == 0]}",
        )
    if shape.num_kv_heads % tp:
        raise _err(
            "parallel.tensor_model_parallel_size",
            tp,
            f"does not divide the {shape.num_kv_heads} key/value heads",
            f"use one of {_divisors(shape.num_kv_heads)}",
        )
    if shape.num_layers % (pp * vpp):
        raise _err(
            "parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size",
            f"{pp}x{vpp}",
            f"does not divide the {shape.num_layers} layers",
            f"choose PP*VPP among {_divisors(shape.num_layers)}",
        )
    if ep > 1 and not shape.num_experts:
        raise _err(
            "parallel.expert_model_parallel_size", ep, "is set for a dense model", "set it to 1"
        )
    if shape.num_experts and shape.num_experts % ep:
        raise _err(
            "parallel.expert_model_parallel_size",
            ep,
            f"does not divide the {shape.num_experts} experts",
            f"use one of {_divisors(shape.num_experts)}",
        )
    mp = tp * pp * cp
    if world_size % mp:
        raise _err(
            "world size",
            world_size,
            f"is not a multiple of TP*PP*CP = {tp}*{pp}*{cp} = {mp}",
            f"launch a multiple of {mp} ranks or change the parallel sizes "
            f"(divisors of {world_size}: {_divisors(world_size)})",
        )
    dp = world_size // mp
    if (tp * cp * dp) % (etp * ep):
        raise _err(
            "parallel.expert_model_parallel_size x expert_tensor_parallel_size",
            f"{ep}x{etp}",
            f"does not divide TP*CP*DP = {tp * cp * dp} (experts are spread over the data- and "
            "context-parallel ranks)",
            f"choose EP*ETP among {_divisors(tp * cp * dp)}",
        )
    return Layout(world_size=world_size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp, vpp=vpp)


def pad_multiple(parallel: ParallelConfig) -> int:
    """Packed sequences are padded to a multiple of this (mcore/packing.pad_multiple's rule)."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    return (2 * cp if cp > 1 else 1) * (tp if parallel.sequence_parallel else 1)


def validate_lengths(config: Config, shape: ModelShape) -> None:
    """Prompt + response must fit the model's positions, and one padded sequence one micro-batch.

    A micro-batch holds `train.max_tokens_per_microbatch` padded tokens per context-parallel rank
    (mcore/packing.py), so the longest sequence, padded, must fit `max_tokens_per_microbatch * CP`.
    """
    total = config.rollout.max_prompt_length + config.rollout.max_response_length
    if shape.max_position_embeddings and total > shape.max_position_embeddings:
        raise ValueError(
            f"rollout.max_prompt_length + rollout.max_response_length = {total} exceeds the model's "
            f"max_position_embeddings={shape.max_position_embeddings}; lower rollout.max_prompt_length "
            "or use a model (or RoPE scaling) with longer positions"
        )
    multiple = pad_multiple(config.parallel)
    cp = config.parallel.context_parallel_size
    padded = max(multiple, -(-total // multiple) * multiple)
    need = -(-padded // cp)
    if config.train.max_tokens_per_microbatch < need:
        per_rank = f" padded to {padded} over CP={cp} ranks" if padded != total or cp > 1 else ""
        raise ValueError(
            f"train.max_tokens_per_microbatch={config.train.max_tokens_per_microbatch} is smaller than "
            f"one full sequence ({total} tokens{per_rank}): raise it to at least {need}"
        )
