"""Hugging Face directory I/O for the converter: lazy safetensors reading, size-bounded sharded writing.

- `check_hf_dir(path)` validates a model directory up front (FileNotFoundError naming what is missing).
- `iter_hf_tensors(path)` yields `(name, tensor)` one at a time from `model.safetensors` or the shards listed
  in `model.safetensors.index.json` (plain reads, no mmap: see `_read_safetensors`).
- `ShardedSafetensorsWriter` buffers tensors up to `max_shard_bytes`, writes `model-0000k-of-0000n
  .safetensors` shards and the index (the same names transformers uses), so export memory is bounded by one
  shard plus the tensor being converted.
- `copy_hf_side_files(src, dst)` copies config, generation config and tokenizer files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
INDEX_NAME = "model.safetensors.index.json"


def check_hf_dir(path: str | os.PathLike[str]) -> Path:
    """Validate an HF model directory: it exists, has config.json and safetensors weights."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"HF model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no config.json: not a Hugging Face model directory"
        )
    if not (p / "model.safetensors").is_file() and not (p / INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no model.safetensors or {INDEX_NAME} (only safetensors weights are read)"
        )
    return p


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory, in order; FileNotFoundError if a shard is missing."""
    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        files = [path / f for f in dict.fromkeys(index["weight_map"].values())]
    else:
        files = [path / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weights file {str(f)!r} listed in {str(path)!r} is missing")
    return files


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read one safetensors file tensor by tensor with plain reads (no mmap).

    safe_open memory-maps the file, and every page touched stays in the process's RSS until the file
    is closed, so a streaming conversion would look (and on tight hosts act) like it holds the whole
    file. Reading each tensor into its own buffer keeps the footprint at one tensor.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(
                    f"{path.name}: tensor {name!r} has unsupported dtype {info['dtype']}"
                )
            start, end = info["data_offsets"]
            out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            nbytes = out.numel() * out.element_size()
            if end - start != nbytes:
                raise ValueError(f"{path.name}: tensor {name!r} byte size does not match its shape")
            f.seek(base + start)
            if nbytes and f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise ValueError(f"{path.name}: truncated file while reading {name!r}")
            yield name, out


def iter_hf_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` from an HF directory's safetensors, one tensor at a time (no mmap)."""
    for f in weight_files(check_hf_dir(path)):
        yield from _read_safetensors(f)


def hf_total_bytes(path: str | os.PathLike[str]) -> int:
    return sum(f.stat().st_size for f in weight_files(check_hf_dir(path)))


def copy_hf_side_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in `src`; return their names."""
    dst_p = Path(dst)
    dst_p.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, dst_p / name)
            copied.append(name)
    return copied


class ShardedSafetensorsWriter:
    """Write tensors into size-bounded safetensors shards plus `model.safetensors.index.json`."""

    def __init__(self, out_dir: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if name in self._buf or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().contiguous()
        if t.untyped_storage().nbytes() != nbytes:
            # a view into a larger storage (e.g. the vocab-cut embedding): safetensors would refuse it
            t = t.clone()
        self._buf[name] = t
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        k = len(self._shards)
        save_file(self._buf, str(self.out_dir / f"shard-{k:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> None:
        """Flush, rename shards to transformers' names, write the index (single file: no index)."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.out_dir / "shard-00000.tmp", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for k, names in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{k:05d}.tmp", self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
