"""The loop's host-side collectives on gloo groups (docs/architecture.md "Process model", "Collectives").

On a GPU cluster the default process group is NCCL, which reduces CUDA tensors only: a CPU tensor
passed to it fails with "No backend type associated with device type cpu", and an object collective
on it stages the pickled bytes through GPU memory. What the loop exchanges between ranks is host
data (the preemption flag, the round results), so it goes through gloo groups created for that
purpose (`new_host_groups`), as verl and slime do for their object gathers. Every function here takes
those groups as an argument; none touches the default group.

Round results (`gather_rollout_results`) are gathered from the first rank of each rollout TP group
only (the other ranks of a TP group generated the same completions from the same prompts): the
leaders all-gather among themselves, then each leader broadcasts the gathered list to its TP group.
They travel as compact arrays: `encode` pickles the object with every long tuple of ints (token
ids, 100K-token prompts) replaced by a reference into one array of the narrowest integer type that
holds them all (uint16 under a 65536-token vocabulary, else int32: 2-4 bytes an id against 3-5
pickled), and a tuple that the records share (the prompt of a group's n responses) is sent once and
decoded into one shared tuple again.
"""

from __future__ import annotations

import io
import itertools
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# tuples of ints at least this long travel in the int array (shorter ones cost less pickled)
MIN_ARRAY_LEN = 16
_HEADER = struct.Struct("<QQc")  # pickle length, ints length, ints dtype code
_DTYPES = {b"H": np.uint16, b"i": np.int32, b"q": np.int64}


@dataclass(frozen=True)
class HostGroups:
    """The gloo groups of the loop's host collectives (every rank builds them: `new_host_groups`).

    `world` spans every rank; `leaders` the first rank of each rollout TP group (None on the other
    ranks); `rollout_tp` this rank's rollout TP group, whose first rank is `leader` (global rank).
    """

    world: dist.ProcessGroup
    leaders: dist.ProcessGroup | None
    rollout_tp: dist.ProcessGroup
    leader: int
    rollout_tp_size: int

    @property
    def is_leader(self) -> bool:
        return dist.get_rank() == self.leader


def new_host_groups(rollout_tp_size: int) -> HostGroups:
    """Create the gloo groups (a collective call: every rank, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if rollout_tp_size < 1 or world % rollout_tp_size:
        raise ValueError(
            f"rollout.tensor_parallel_size={rollout_tp_size} must divide the world size {world}"
        )
    everyone = dist.new_group(backend="gloo")
    leaders = dist.new_group(list(range(0, world, rollout_tp_size)), backend="gloo")
    mine = None
    for first in range(0, world, rollout_tp_size):
        group = dist.new_group(list(range(first, first + rollout_tp_size)), backend="gloo")
        if first <= rank < first + rollout_tp_size:
            mine = group
    assert mine is not None
    leader = rank - rank % rollout_tp_size
    return HostGroups(
        world=everyone,
        leaders=leaders if rank == leader else None,
        rollout_tp=mine,
        leader=leader,
        rollout_tp_size=rollout_tp_size,
    )


def any_rank(flag: bool, groups: HostGroups) -> bool:
    """True on every rank if it is true on any rank (a CPU all-reduce on the gloo world group)."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups.world)
    return bool(t.item() > 0)


def gather_rollout_results(obj: Any, groups: HostGroups) -> list[Any]:
    """The objects of every rollout TP group's leader, in rank order, on every rank.

    The other ranks' `obj` is not sent (their TP group's leader holds the same results).
    """
    payloads: list[Any] = [None]
    if groups.leaders is not None:
        gathered: list[Any] = [None] * dist.get_world_size(groups.leaders)
        dist.all_gather_object(gathered, encode(obj), group=groups.leaders)
        payloads = [gathered]
    if groups.rollout_tp_size > 1:
        dist.broadcast_object_list(payloads, src=groups.leader, group=groups.rollout_tp)
    return [decode(p) for p in payloads[0]]


class _Encoder(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays: list[tuple[int, ...]] = []
        self._index: dict[int, int] = {}  # id(tuple) -> its index (a shared tuple is sent once)

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) is not tuple or len(obj) < MIN_ARRAY_LEN:
            return None
        key = id(obj)
        if key not in self._index:
            if not all(type(x) is int for x in obj):
                return None
            self._index[key] = len(self.arrays)
            self.arrays.append(obj)
        return self._index[key]


class _Decoder(pickle.Unpickler):
    def __init__(self, data: bytes, ints: np.ndarray, bounds: list[tuple[int, int]]) -> None:
        super().__init__(io.BytesIO(data))
        self.ints, self.bounds = ints, bounds
        self._tuples: dict[int, tuple[int, ...]] = {}

    def persistent_load(self, pid: Any) -> tuple[int, ...]:
        if pid not in self._tuples:
            lo, hi = self.bounds[pid]
            self._tuples[pid] = tuple(self.ints[lo:hi].tolist())
        return self._tuples[pid]


def encode(obj: Any) -> bytes:
    """`obj` pickled with its long int tuples in one integer array: see the module docstring."""
    buf = io.BytesIO()
    enc = _Encoder(buf)
    enc.dump(obj)
    lengths = np.array([len(a) for a in enc.arrays], dtype=np.int64)
    total = int(lengths.sum())
    ints = np.fromiter(itertools.chain.from_iterable(enc.arrays), dtype=np.int64, count=total)
    code = _smallest_dtype(ints)
    meta = pickle.dumps((buf.getvalue(), lengths.tobytes()), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(meta), ints.size, code) + meta + ints.astype(_DTYPES[code]).tobytes()


def _smallest_dtype(ints: np.ndarray) -> bytes:
    """The code of the narrowest of uint16, int32, int64 that holds every value."""
    if ints.size == 0:
        return b"H"
    lo, hi = int(ints.min()), int(ints.max())
    for code, dtype in _DTYPES.items():
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return code
    return b"q"


def decode(payload: bytes) -> Any:
    """The object `encode` was given (its int tuples as tuples again, shared ones shared)."""
    meta_len, n_ints, code = _HEADER.unpack_from(payload)
    start = _HEADER.size
    data, lengths_raw = pickle.loads(payload[start : start + meta_len])
    ints = np.frombuffer(payload, dtype=_DTYPES[code], count=n_ints, offset=start + meta_len)
    ends = np.cumsum(np.frombuffer(lengths_raw, dtype=np.int64)).tolist()
    bounds = list(zip([0, *ends[:-1]], ends))
    return _Decoder(data, ints, bounds).load()
