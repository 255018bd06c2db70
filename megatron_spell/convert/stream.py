"""Streaming HF <-> Megatron-Core tensor conversion driven by the tables.

- `hf_to_megatron_state_dict(hf_tensors, hf_config)`: consumes `(hf_name, tensor)` in any order and yields
  `(megatron_name, full_tensor)` as soon as all HF parts of a Megatron tensor have arrived (q/k/v of a layer,
  gate/up of an MLP). Memory held = the parts of not-yet-complete tensors, normally one layer's worth.
  Megatron names are the local-spec `GPTModel.state_dict()` names at TP=PP=EP=1 (global layer/expert index).
- `megatron_to_hf(megatron_name, full_tensor, hf_config)`: one full (TP-gathered, global-index) Megatron
  tensor -> its HF tensor(s). Per tensor, no whole-model state; used by the exporter and the weight sync.

Both raise ValueError naming the tensor for unknown names, indices out of range, missing parts or shapes
that do not match the config. Experts are always written per expert (the format transformers 5.x
`save_pretrained` writes for Qwen3-MoE and vLLM 0.32 reads); the fused `gate_up_proj`/`down_proj` input
layout is read as well.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from megatron_spell.convert import transforms as T
from megatron_spell.convert.tables import (
    HF_FUSED_EXPERTS,
    HF_IGNORED_SUFFIXES,
    MEGATRON_ALIASES,
    ArchFamily,
    Rule,
    attention_dims,
    get_family,
)
from megatron_spell.families import tied_embeddings


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(body + "$")


@functools.cache
def _hf_index(family: ArchFamily) -> tuple[tuple[re.Pattern[str], Rule, int], ...]:
    return tuple((_regex(h), r, slot) for r in family.rules for slot, h in enumerate(r.hf))


@functools.cache
def _mg_index(family: ArchFamily) -> tuple[tuple[re.Pattern[str], Rule], ...]:
    by_name = {r.megatron: r for r in family.rules}
    out = [(_regex(r.megatron), r) for r in family.rules]
    out += [(_regex(alias), by_name[canon]) for alias, canon in MEGATRON_ALIASES]
    return tuple(out)


def _fmt(pattern: str, i: int | None, e: int | None) -> str:
    return pattern.replace("{i}", str(i)).replace("{e}", str(e))


def _check_indices(name: str, hf_config: Any, i: int | None, e: int | None) -> None:
    if i is not None and i >= hf_config.num_hidden_layers:
        raise ValueError(f"{name}: layer {i} >= num_hidden_layers={hf_config.num_hidden_layers}")
    n = get_family(hf_config).num_experts(hf_config)
    if e is not None and e >= n:
        raise ValueError(f"{name}: expert {e} >= num_experts={n}")


def expected_megatron_names(hf_config: Any) -> list[str]:
    """Every Megatron tensor name a complete conversion of this config yields, in model order."""
    fam = get_family(hf_config)
    names = []
    for r in fam.rules:
        if "{i}" not in r.megatron:
            if fam.condition(hf_config, r.when):
                names.append(r.megatron)
            continue
        for i in range(hf_config.num_hidden_layers):
            if not fam.condition(hf_config, r.when, i):
                continue
            experts = range(fam.num_experts(hf_config)) if r.expert else [None]
            names += [_fmt(r.megatron, i, e) for e in experts]
    return names


def _to_megatron(rule: Rule, parts: list[torch.Tensor], hf_config: Any, padded_vocab: int | None):
    if rule.transform == "qkv":
        return T.qkv_fuse(*parts, *attention_dims(hf_config))
    if rule.transform == "gate_up":
        return T.gate_up_fuse(*parts)
    if rule.transform == "vocab" and padded_vocab is not None:
        return T.pad_vocab(parts[0], padded_vocab)
    return parts[0]


def _expand_fused(
    name: str, tensor: torch.Tensor, hf_config: Any
) -> list[tuple[str, torch.Tensor]]:
    """HF fused experts tensor -> per-expert HF names, or [] if `name` is not a fused experts tensor."""
    for kind, pattern in HF_FUSED_EXPERTS.items():
        m = _regex(pattern).match(name)
        if not m:
            continue
        i = int(m["i"])
        _check_indices(name, hf_config, i, None)
        e_n = get_family(hf_config).num_experts(hf_config)
        pre = f"model.layers.{i}.mlp.experts."
        if kind == "gate_up":
            split = T.split_fused_experts(tensor, None, e_n)
            return [
                (pre + f"{e}.{p}_proj.weight", t)
                for e, g, u, _ in split
                for p, t in (("gate", g), ("up", u))
            ]
        split = T.split_fused_experts(None, tensor, e_n)
        return [(pre + f"{e}.down_proj.weight", d) for e, _, _, d in split]
    return []


def hf_to_megatron_state_dict(
    hf_tensors: Iterable[tuple[str, torch.Tensor]],
    hf_config: Any,
    *,
    padded_vocab_size: int | None = None,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF tensors -> `(megatron_name, full_tensor)` (see module docstring).

    padded_vocab_size: pad embedding/output rows with zeros to this size (Megatron's padded vocab).
    expected_shapes: Megatron name -> shape the target model has; a mismatch raises ValueError naming
    the Megatron tensor and its HF sources.
    """
    fam = get_family(hf_config)
    tied = tied_embeddings(hf_config)
    index = _hf_index(fam)
    expected = expected_megatron_names(hf_config)
    pending: dict[str, list[torch.Tensor | None]] = {}
    done: set[str] = set()

    def feed(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(HF_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            return
        fused = _expand_fused(name, tensor, hf_config)
        if fused:
            for sub_name, sub in fused:
                yield from feed(sub_name, sub)
            return
        hit = next(((m, r, k) for rx, r, k in index if (m := rx.match(name))), None)
        if hit is None:
            raise ValueError(f"HF tensor {name!r} has no mapping for {fam.name}")
        m, rule, slot = hit
        i = int(m["i"]) if "i" in m.groupdict() else None
        e = int(m["e"]) if "e" in m.groupdict() else None
        _check_indices(name, hf_config, i, e)
        if not fam.condition(hf_config, rule.when, i):
            raise ValueError(
                f"HF tensor {name!r} is unexpected for this config ({rule.when!r} is off)"
            )
        mg = _fmt(rule.megatron, i, e)
        parts = pending.setdefault(mg, [None] * len(rule.hf))
        parts[slot] = tensor
        if any(p is None for p in parts):
            return
        del pending[mg]
        out = _to_megatron(rule, parts, hf_config, padded_vocab_size)
        if expected_shapes is not None and tuple(out.shape) != tuple(expected_shapes[mg]):
            srcs = [_fmt(h, i, e) for h in rule.hf]
            raise ValueError(
                f"tensor shape mismatch: {srcs} give {mg} of shape {tuple(out.shape)}, but the model "
                f"built from config.json expects {tuple(expected_shapes[mg])}"
            )
        done.add(mg)
        yield mg, out

    for name, tensor in hf_tensors:
        yield from feed(name, tensor)
    missing = [n for n in expected if n not in done]
    if missing:
        detail = [
            f"{n} (have parts: {[p is not None for p in pending.get(n, [])]})" for n in missing
        ]
        raise ValueError(
            f"{len(missing)} Megatron tensors could not be built, HF tensors missing: {detail[:5]}"
        )


def megatron_to_hf(
    megatron_name: str,
    tensor: torch.Tensor,
    hf_config: Any,
    *,
    include_tied_lm_head: bool = False,
) -> list[tuple[str, torch.Tensor]]:
    """One full Megatron tensor (global layer/expert index) -> its HF `(name, tensor)` list.

    Accepts local-spec names, TE fused-norm names and grouped-expert names (`...weight{e}`). The
    embedding/output rows are cut back to `hf_config.vocab_size`. For tied models, `output_layer.weight`
    (present on the last pipeline stage) maps to `lm_head.weight`, and `include_tied_lm_head=True` makes the
    embedding yield `lm_head.weight` as well (vLLM's weight update needs it explicitly).
    """
    fam = get_family(hf_config)
    hit = next(((m, r) for rx, r in _mg_index(fam) if (m := rx.match(megatron_name))), None)
    if hit is None:
        raise ValueError(f"Megatron tensor {megatron_name!r} has no HF mapping for {fam.name}")
    m, rule = hit
    i = int(m["i"]) if "i" in m.groupdict() else None
    e = int(m["e"]) if "e" in m.groupdict() else None
    _check_indices(megatron_name, hf_config, i, e)
    names = [_fmt(h, i, e) for h in rule.hf]
    if rule.transform == "qkv":
        return list(zip(names, T.qkv_split(tensor, *attention_dims(hf_config)), strict=True))
    if rule.transform == "gate_up":
        return list(zip(names, T.gate_up_split(tensor), strict=True))
    if rule.transform == "vocab":
        vocab = int(hf_config.vocab_size)
        if tensor.shape[0] < vocab:
            raise ValueError(f"{megatron_name}: {tensor.shape[0]} rows < vocab_size={vocab}")
        cut = tensor[:vocab]
        out = [(names[0], cut)]
        tied = tied_embeddings(hf_config)
        if include_tied_lm_head and tied and megatron_name.startswith("embedding."):
            out.append(("lm_head.weight", cut))
        return out
    return [(names[0], tensor)]


def canonical_megatron_name(name: str) -> str:
    """Map a TE-spec or grouped-expert parameter name onto the local-spec name the tables use."""
    for alias, canon in MEGATRON_ALIASES:
        m = _regex(alias).match(name)
        if m:
            d = m.groupdict()
            return _fmt(canon, d.get("i"), d.get("e"))
    return name
