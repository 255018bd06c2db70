"""Megatron-Core distributed checkpoints of HF models: convert, load at any layout, export.

Checkpoint directory layout (Megatron-LM's, so a Megatron-LM run can `--load` it as a release checkpoint):

    CKPT/latest_checkpointed_iteration.txt   "release"
    CKPT/release/                            dist_checkpointing, torch_dist format
                                             state dict {"model": GPTModel.sharded_state_dict(), ...}
    CKPT/hf/                                 config.json, generation_config.json, tokenizer files
    CKPT/conversion.json                     source dir, dtype, tensor count, megatron-core version

Training checkpoints (`<run_dir>/checkpoints/step_N/model/`, megatron_spell/checkpointing.py) are the
same format with the optimizer and scheduler beside the model; `export_run` (`megatron-spell export`)
reads only their model tensors, with the HF config and tokenizer of the run's `model.hf_dir`.

How the keys are made exact: `convert_hf_to_megatron` builds the model at TP=PP=EP=1 in this process
(`build_model`), copies the streamed, converted tensors into its parameters and saves
`model.sharded_state_dict()`. So the keys, global shapes and layer/expert stacking are by construction what
any GPTModel asks for; dist_checkpointing reshards at load (TP/PP/EP/VPP). Extra alias key: for MoE layers
the local spec stores the pre-MLP norm as `mlp.linear_fc1.layer_norm_weight` while the Transformer Engine
MoE spec asks for `pre_mlp_layernorm.weight`; both are written so either spec loads the checkpoint.

Memory (SmolLM2-135M fp32, 538 MB, fresh process, above the ~560 MB import baseline): HF -> Megatron
peaks at ~1.6x the model size (the model in the target dtype, its random init, ~0.2x for the torch_dist
save; the HF tensors are read one at a time without mmap); Megatron -> HF also at ~1.6x (the model
plus the tensors dist_checkpointing loads before `load_state_dict` copies them in; output shards reuse
the parameters' storage instead of copying). Both scale linearly with the model: a 7B bf16 model needs
~25-30 GB of host RAM. A layer-by-layer writer would cut that, at the price of building the sharding
metadata by hand instead of taking it from GPTModel.sharded_state_dict().
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling
from tqdm import tqdm

from megatron_spell.config import ParallelConfig
from megatron_spell.convert.hf_io import (
    ShardedSafetensorsWriter,
    check_hf_dir,
    copy_hf_side_files,
    hf_total_bytes,
    iter_hf_tensors,
)
from megatron_spell.convert.stream import canonical_megatron_name, hf_to_megatron_state_dict
from megatron_spell.convert.stream import megatron_to_hf as _megatron_to_hf
from megatron_spell.convert.tables import get_family

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
HF_SUBDIR = "hf"
# `model.dtype` / the tools' --dtype names -> torch dtypes (the one such table; train.py takes vLLM's
# dtype name from it too)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ConversionStats:
    """What one conversion moved and cost.

    baseline_rss_mb: RSS when the conversion started (imports done); peak_rss_mb: the process high-water
    mark, which can include transients from before the start (then it understates the conversion's own
    need, so measure with a fresh process: the tools do).
    """

    tensors: int
    bytes_written: int
    seconds: float
    baseline_rss_mb: float
    peak_rss_mb: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def _rss_mb() -> float:
    """Process high-water mark RSS in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    """Current RSS in MB (the baseline: the high-water mark may come from a transient during imports)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def resolve_release_dir(ckpt_dir: str | os.PathLike[str]) -> Path:
    """CKPT -> CKPT/<iteration dir> via the tracker file; a dist-checkpoint dir itself is returned as is."""
    p = Path(ckpt_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist")
    if (p / "metadata.json").is_file():
        return p
    tracker = p / TRACKER
    if not tracker.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a Megatron checkpoint: no {TRACKER} and no metadata.json"
        )
    it = tracker.read_text().strip()
    sub = p / (RELEASE if it == RELEASE else f"iter_{int(it):07d}")
    if not (sub / "metadata.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(sub)!r} named by {TRACKER} is missing or incomplete"
        )
    return sub


def hf_dir_of(ckpt_dir: str | os.PathLike[str]) -> Path:
    """The HF config/tokenizer directory stored inside a converted checkpoint."""
    p = Path(ckpt_dir) / HF_SUBDIR
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no config.json (not written by convert_hf_to_megatron?)"
        )
    return p


def _build_single_rank_model(hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    from megatron_spell.mcore.model import build_model
    from megatron_spell.mcore.parallel import init_parallel

    ctx = init_parallel(ParallelConfig())  # the defaults: one rank, TP=PP=CP=EP=1
    (model,) = build_model(hf_config, ctx, dtype=dtype)
    return model


def _param_table(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model tensors keyed by their canonical (local-spec, global-index at TP=PP=1) names."""
    return {
        canonical_megatron_name(n): t
        for n, t in model.state_dict(keep_vars=True).items()
        if not n.endswith("_extra_state")
    }


def _add_te_moe_norm_aliases(sd: dict[str, Any]) -> None:
    """For MoE layers also store the pre-MLP norm under the TE MoE spec's key (see module docstring)."""
    for name, sh in list(sd.items()):
        if not (name.endswith("pre_mlp_layernorm.weight") and isinstance(sh, ShardedTensor)):
            continue
        if name.replace("pre_mlp_layernorm.weight", "mlp.router.weight") not in sd:
            continue
        alias = sh.key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
        if alias != sh.key:
            sd[name + ".__te_alias"] = dataclasses.replace(sh, key=alias)


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ConversionStats:
    """Convert an HF model directory into a Megatron-Core dist checkpoint at `out_dir` (layout above)."""
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel

    hf_path = check_hf_dir(hf_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {str(out)!r} is not empty; remove it or choose another")
    hf_config = load_hf_config(hf_path)
    get_family(hf_config)  # unsupported architectures fail before any heavy work
    baseline, t0 = _current_rss_mb(), time.perf_counter()
    model = _build_single_rank_model(hf_config, dtype)
    try:
        params = _param_table(model)
        shapes = {n: tuple(t.shape) for n, t in params.items()}
        padded_vocab = shapes["embedding.word_embeddings.weight"][0]
        stream = hf_to_megatron_state_dict(
            iter_hf_tensors(hf_path),
            hf_config,
            padded_vocab_size=padded_vocab,
            expected_shapes=shapes,
        )
        filled: set[str] = set()
        total = hf_total_bytes(hf_path)
        with (
            torch.no_grad(),
            tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar,
        ):
            for name, tensor in stream:
                params[name].copy_(tensor)
                filled.add(name)
                bar.update(tensor.numel() * tensor.element_size())
        if missing := sorted(set(params) - filled):
            raise ValueError(
                f"the Megatron model has tensors the converter did not fill: {missing[:5]}"
            )
        release = out / RELEASE
        release.mkdir(parents=True)
        sd = model.sharded_state_dict()
        _add_te_moe_norm_aliases(sd)
        dist_checkpointing.save(
            {"model": sd, "checkpoint_version": 3.0, "iteration": 0}, str(release)
        )
        (out / TRACKER).write_text(RELEASE)
        copy_hf_side_files(hf_path, out / HF_SUBDIR)
        nbytes = sum(t.numel() * t.element_size() for t in params.values())
        stats = ConversionStats(len(filled), nbytes, time.perf_counter() - t0, baseline, _rss_mb())
        meta = {
            "source": str(hf_path.resolve()),
            "dtype": str(dtype).removeprefix("torch."),
            **_stats(stats),
        }
        (out / "conversion.json").write_text(json.dumps(meta, indent=2) + "\n")
        return stats
    finally:
        destroy_parallel()


def _stats(s: ConversionStats) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["mb_per_s"] = round(s.mb_per_s, 1)
    import megatron.core

    d["megatron_core"] = megatron.core.__version__
    return d


def load_checkpoint(
    model_chunks: Sequence[torch.nn.Module], ckpt_dir: str | os.PathLike[str]
) -> None:
    """Load a dist checkpoint into this rank's model chunks, for any TP/PP/EP/VPP layout.

    Every rank of the job calls it. ValueError if the checkpoint lacks a tensor the model needs. The
    layout is taken from the chunks' sharded_state_dict.
    """
    release = resolve_release_dir(ckpt_dir)
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    sharded = {k: c.sharded_state_dict() for k, c in zip(keys, model_chunks, strict=True)}
    # Megatron's naming: "missing" = in the checkpoint but not requested (our MoE norm alias, harmless);
    # "unexpected" = requested by the model but absent from the checkpoint (an error).
    loaded, _ckpt_only, absent = dist_checkpointing.load(
        sharded, str(release), strict=StrictHandling.RETURN_ALL
    )
    if absent:
        raise ValueError(
            f"checkpoint {str(release)!r} lacks tensors the model needs: {sorted(absent)[:5]}"
        )
    for k, chunk in zip(keys, model_chunks, strict=True):
        chunk.load_state_dict(loaded[k], strict=True)


def convert_megatron_to_hf(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> ConversionStats:
    """Export a converted checkpoint to an HF directory (safetensors shards + index, config, tokenizer).

    dtype: output dtype (default: the checkpoint's). Memory: the TP=1 model + one output shard.
    """
    resolve_release_dir(ckpt_dir)
    meta_path = Path(ckpt_dir) / "conversion.json"
    ck_dtype = torch.float32
    if meta_path.is_file():
        ck_dtype = getattr(torch, json.loads(meta_path.read_text()).get("dtype", "float32"))
    return _export_to_hf(
        ckpt_dir,
        hf_dir_of(ckpt_dir),
        out_dir,
        ck_dtype,
        dtype or ck_dtype,
        max_shard_bytes,
        progress,
    )


def export_checkpoint(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> ConversionStats:
    """`convert_megatron_to_hf` for a converted checkpoint (`TRACKER` or `metadata.json` in `path`),
    else `export_run` for a training run directory or one of its step directories."""
    p = Path(path)
    if (p / TRACKER).is_file() or (p / "metadata.json").is_file():
        if step is not None:
            raise ValueError(
                f"--step {step}: {str(p)!r} is a converted checkpoint, it has no steps"
            )
        return convert_megatron_to_hf(
            p, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress
        )
    if p.is_dir() and not (p / "config.yaml").is_file() and not (p / "model").is_dir():
        raise FileNotFoundError(
            f"{str(p)!r} is neither a converted checkpoint (no {TRACKER}) nor a training run "
            "directory (no config.yaml) nor one of its checkpoints/step_XXXXXXXX directories"
        )
    return export_run(
        p, out_dir, step=step, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress
    )


def export_run(
    run_or_step_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> ConversionStats:
    """Export a training run's checkpoint (`<run_dir>/checkpoints/step_N/model`) to an HF directory.

    `run_or_step_dir`: the run directory (then `step`, default the latest complete one) or a step
    directory in it. The checkpoint holds model, optimizer and scheduler at the layout the run saved
    (any TP/PP/EP); only the model tensors are read, resharded to one rank. Config and tokenizer come
    from the run's `model.hf_dir` (or the `hf/` inside `model.load`); dtype: the output dtype
    (default: the run's `model.dtype`, the dtype the model was trained in). Memory: as
    `convert_megatron_to_hf`.
    """
    from megatron_spell.checkpointing import find_checkpoint
    from megatron_spell.config import load_config

    run_dir, ckpt = find_checkpoint(run_or_step_dir, step)
    try:
        config = load_config(run_dir / "config.yaml")
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{str(run_dir / 'config.yaml')!r} does not load: {e}") from e
    model_dtype = DTYPES[config.model.dtype]
    return _export_to_hf(
        ckpt / "model",
        run_hf_dir(config.model.hf_dir, config.model.load),
        out_dir,
        model_dtype,
        dtype or model_dtype,
        max_shard_bytes,
        progress,
    )


def run_hf_dir(hf_dir: str, load: str) -> Path:
    """The HF directory giving a run's config and tokenizer: `model.hf_dir`, else `model.load`/hf."""
    tried = [Path(hf_dir)] + ([Path(load) / HF_SUBDIR] if load else [])
    for path in tried:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"the run's HF config is not found: no config.json in {', '.join(map(repr, map(str, tried)))}"
        " (model.hf_dir, model.load/hf of its config.yaml); the export needs its config and tokenizer"
    )


def _export_to_hf(
    ckpt_dir: str | os.PathLike[str],
    hf_src: Path,
    out_dir: str | os.PathLike[str],
    ck_dtype: torch.dtype,
    out_dtype: torch.dtype,
    max_shard_bytes: int,
    progress: bool,
) -> ConversionStats:
    """Load the model tensors of a dist checkpoint at TP=1 and write them as an HF directory."""
    from megatron_spell.mcore.model import load_hf_config
    from megatron_spell.mcore.parallel import destroy_parallel

    resolve_release_dir(ckpt_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {str(out)!r} is not empty; remove it or choose another")
    hf_config = load_hf_config(hf_src)
    get_family(hf_config)
    baseline, t0 = _current_rss_mb(), time.perf_counter()
    model = _build_single_rank_model(hf_config, ck_dtype)
    try:
        load_checkpoint([model], ckpt_dir)
        writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
        params = _param_table(model)
        n = 0
        for name, tensor in tqdm(params.items(), unit="tensor", disable=not progress):
            for hf_name, hf_tensor in _megatron_to_hf(name, tensor.detach(), hf_config):
                writer.add(hf_name, hf_tensor.to(out_dtype))
                n += 1
        writer.close()
    finally:
        destroy_parallel()
    write_hf_side_files(hf_src, out_dir, out_dtype)
    return ConversionStats(n, writer.total_bytes, time.perf_counter() - t0, baseline, _rss_mb())


def write_hf_side_files(
    hf_src: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: torch.dtype
) -> None:
    """Config (its dtype set to `dtype`), generation config and tokenizer files from `hf_src`."""
    copy_hf_side_files(hf_src, out_dir)
    _set_config_dtype(Path(out_dir) / "config.json", dtype)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
