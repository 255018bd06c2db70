"""Atomic, rotating checkpoint directories and the non-weight RL state a resume needs.

Layout: `<run_dir>/checkpoints/step_00000012/` holding `model/` (Megatron distributed checkpoint of model,
optimizer and LR schedule, written by every rank), `state.pt` (this module's `RLState`) and `COMPLETE`.
A save goes to `step_XXXX.tmp/` first; only after every rank has finished does rank 0 write `COMPLETE` and rename
it into place, so a kill during a save leaves the previous checkpoint the latest loadable one. The last
`keep_last` complete checkpoints are kept.

`find_checkpoint(path, step)` picks a run's checkpoint for export (`megatron-spell export`), with errors that
name the path and the steps there are.

The RL state is everything besides weights (docs/spell-algorithm.md D12: the reference checkpoints
neither the history memory nor the sampler position; we do): step, the Python/NumPy/torch RNG
states, the domain sampler cursor, the history memory, and the curriculum stage.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class RLState:
    """What a resume restores besides the Megatron weights and optimizer."""

    step: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    curriculum: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch (CPU, and CUDA when present)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Finds, writes and rotates checkpoints under `root`. Every rank makes the same calls."""

    def __init__(
        self,
        root: str | Path,
        *,
        keep_last: int = 2,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "COMPLETE").is_file():
                found.append((int(match.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None], state: RLState) -> Path:
        """`write(tmp_dir)` runs on every rank (the Megatron save); rank 0 then seals and rotates."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        write(tmp)
        self.barrier()
        if self.rank == 0:
            torch.save(state.__dict__, tmp / "state.pt")
            (tmp / "COMPLETE").write_text(f"{step}\n")
            if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
            log.info("checkpoint saved: %s", final)
        self.barrier()
        return final

    def _rotate(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint removed (keep_last=%d): %s", self.keep_last, old)

    @staticmethod
    def load_state(ckpt_dir: str | Path) -> RLState:
        path = Path(ckpt_dir) / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} missing: {ckpt_dir} is not a complete SPELL checkpoint"
            )
        payload = torch.load(path, weights_only=False)
        payload.pop("extra", None)  # an unused field that older checkpoints still carry
        return RLState(**payload)


def _steps_in(root: Path) -> tuple[list[int], list[str]]:
    """(complete steps, names of incomplete step directories) under a checkpoints directory."""
    complete, incomplete = [], []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            match = _STEP_DIR.match(path.name.removesuffix(".tmp"))
            if not match or not path.is_dir():
                continue
            if path.name.endswith(".tmp") or not (path / "COMPLETE").is_file():
                incomplete.append(path.name)
            else:
                complete.append(int(match.group(1)))
    return sorted(complete), incomplete


def _available(root: Path) -> str:
    complete, incomplete = _steps_in(root)
    text = f"available steps: {', '.join(map(str, complete)) or 'none'}"
    if incomplete:
        text += f" (incomplete, not loadable: {', '.join(incomplete)})"
    return text


def find_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """(run directory, complete checkpoint directory) of a run for `step` (None: the latest).

    `path` is a run directory (holding `config.yaml` and `checkpoints/`) or one of its
    `checkpoints/step_XXXXXXXX` directories (then `step` must be None or that step).
    FileNotFoundError naming the path and the available steps when there is no such checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    match = _STEP_DIR.match(path.name)
    if match and path.parent.name == "checkpoints":
        if step is not None and step != int(match.group(1)):
            raise ValueError(f"--step {step} contradicts the checkpoint directory {str(path)!r}")
        path, step = path.parents[1], int(match.group(1))
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a run directory: no config.yaml (pass the directory "
            "`megatron-spell train` wrote, <output_dir>/<run_name>)"
        )
    root = path / "checkpoints"
    if step is None:
        latest = CheckpointManager(root).latest()
        if latest is None:
            raise FileNotFoundError(
                f"{str(root)!r} holds no complete checkpoint; {_available(root)}"
            )
        return path, latest
    ckpt = CheckpointManager(root).step_dir(step)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint of step {step} ({str(ckpt)!r}); {_available(root)}")
    if not (ckpt / "COMPLETE").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(ckpt)!r} is incomplete (no COMPLETE: its save did not finish); "
            f"{_available(root)}"
        )
    return path, ckpt
