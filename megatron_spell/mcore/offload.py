"""Megatron's training state off the device and back, between the phases of one colocated RL step
(docs/architecture.md, "Process model" and "One step on one device").

vLLM and Megatron share each GPU and take turns. While vLLM generates, Megatron needs none of its
training state on the device; the loop (through `MegatronPolicy.onload`, `offload_training_state`
and `offload_params`) moves it with the functions here:

* `offload_grads(ddp_chunks)` / `onload_grads(ddp_chunks)`: the DDP grad buffers (`grad_data` of
  every buffer and expert-parallel buffer of every chunk) are freed with
  `untyped_storage().resize_(0)` and re-allocated, zeroed, before the next update. The grads are
  spent after the optimizer step, so nothing is copied. `param.main_grad` and the buckets'
  `grad_data` are views of that storage, so they stay valid objects and see the new memory again.
  This runs on CPU as well, and there it really frees host memory.
* `offload_params(ddp_chunks)` / `onload_params(ddp_chunks)`: the parameters' storage (a buffer's
  flat `param_data` with the distributed optimizer, otherwise each parameter's own storage) is
  copied byte for byte to host memory (pinned on CUDA) and freed; onload re-allocates it and copies
  it back.
* `offload_optimizer(optimizer)` / `onload_optimizer(optimizer)`: the same for the optimizer's
  tensors that are not model parameters: every device tensor of the inner optimizer's state (Adam's
  `exp_avg`, `exp_avg_sq`, a fused optimizer's `step`) and the fp32 main copies of 16-bit parameters
  (`fp32_from_float16_groups` of the mixed-precision optimizer, `shard_fp32_from_float16_groups` of
  the distributed one), for each member of a `ChainedOptimizer`. Main parameters that *are* model
  parameters (fp32 models; the distributed optimizer's fp32 shards are views of `param_data`) are
  left to `offload_params`.

How the moves work. A tensor is never re-pointed (no `p.data = p.data.cpu()`): the storage under it
is copied to a host byte buffer and resized to 0, then resized back and filled. Parameters,
optimizer param groups, state dicts and every view (`main_grad`, the distributed optimizer's shards,
the DDP buckets) keep their identity and device, and the values come back bit for bit. Storages
shared by several tensors are moved once.

Device. Each tensor's own device decides: state already on the host (a CPU run) is left alone, so on
CPU the same calls run and only the grad free acts. `force=True` copies and frees host-resident
storage too (the tests use it to exercise the GPU path's bookkeeping on CPU). Host copies are made
non-blocking from pinned memory on CUDA, and each offload waits for its copies before it returns. No
function calls `torch.cuda.empty_cache()`; the loop does it between the phases.

State. What was freed is kept on the object it belongs to (each DDP buffer, each optimizer member)
as an `OffloadState` (`offload_state(obj)`), so a second offload and an onload without an offload do
nothing, and a run may skip any of the moves. A freed tensor must not be touched until it is
onloaded (undefined behaviour: a kernel may read through a null pointer and crash the process). Each
function returns the bytes it freed or restored. Not covered: Megatron-FSDP, HybridDeviceOptimizer,
buffers whose params and grads share one storage (MXFP8 param gather reuses the grad buffer; such
grads are not freed), the `extra_main_grads` of NVFP4 buckets.

Anchors (verl at b178a3cd5): `verl/utils/megatron_utils.py`, `offload_megatron_model_to_cpu` /
`load_megatron_model_to_gpu` (the `param_data` and `grad_data` storage resizes, grads zeroed on
load), `offload_megatron_copy_params` / `load_megatron_copy_params` (the distributed optimizer's
`shard_fp32_from_float16_groups`), `offload_megatron_optimizer` / `load_megatron_optimizer`
(`exp_avg`, `exp_avg_sq`, walking `ChainedOptimizer.chained_optimizers`); when they are called:
`verl/workers/megatron_workers.py`, `update_actor` (load params + grads and the optimizer, step,
offload both), `rollout_mode` (params back for the weight sync, offloaded after it) and
`generate_sequences` (optimizer offloaded before generation). Megatron-Core 0.19 has
`_ParamAndGradBuffer.offload_to_cpu` and `MegatronOptimizer.offload_to_cpu`; the latter re-points
every param-group tensor, model parameters of an fp32 model included, which would detach them from
the DDP buffer, hence this module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

_ATTR = "_megatron_spell_offload"


@dataclass
class _Slot:
    """One freed storage: its size and, unless freed without a copy, its bytes on the host."""

    storage: torch.UntypedStorage
    nbytes: int
    host: torch.Tensor | None  # uint8 [nbytes]; None: freed without a copy, zeroed when restored


@dataclass
class OffloadState:
    """What one DDP buffer or optimizer member has off the device (empty lists: all on it)."""

    grads: list[_Slot] = field(default_factory=list)
    params: list[_Slot] = field(default_factory=list)
    optimizer: list[_Slot] = field(default_factory=list)

    @property
    def grads_offloaded(self) -> bool:
        return bool(self.grads)

    @property
    def params_offloaded(self) -> bool:
        return bool(self.params)

    @property
    def optimizer_offloaded(self) -> bool:
        return bool(self.optimizer)


def offload_state(obj: Any) -> OffloadState:
    """The `OffloadState` kept on `obj` (a DDP buffer or an optimizer member), made on first use."""
    state = getattr(obj, _ATTR, None)
    if state is None:
        state = OffloadState()
        setattr(obj, _ATTR, state)
    return state


# --- storage moves --------------------------------------------------------------------------------


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _on_host(storage: torch.UntypedStorage) -> bool:
    return storage.device.type == "cpu"


def _free(storage: torch.UntypedStorage, *, copy: bool) -> _Slot:
    """Copy the storage's bytes to the host (when `copy`) and resize it to 0."""
    nbytes = storage.nbytes()
    host = None
    if copy:
        pin = storage.device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin)
        host.copy_(_bytes(storage), non_blocking=pin)
    # the copy is queued before the free on the same stream, so the caching allocator cannot
    # hand the block to anyone before the copy has read it
    storage.resize_(0)
    return _Slot(storage, nbytes, host)


def _restore(slot: _Slot) -> None:
    """Re-allocate the storage and fill it from the host copy (or with zeros)."""
    slot.storage.resize_(slot.nbytes)
    data = _bytes(slot.storage)
    if slot.host is None:
        data.zero_()
    else:
        data.copy_(slot.host, non_blocking=slot.host.is_pinned())


def _wait(slots: Iterable[_Slot]) -> None:
    """Block until the queued device-host copies of `slots` are done (a no-op on CPU)."""
    devices = {s.storage.device for s in slots if s.storage.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


def _unique_storages(tensors: Iterable[torch.Tensor | None]) -> list[torch.UntypedStorage]:
    """The distinct, non-empty storages under `tensors`, in first-seen order."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0 or ptr in seen:
            continue
        seen.add(ptr)
        out.append(storage)
    return out


# --- DDP buffers: grads and params ----------------------------------------------------------------


def _buffers(ddp_chunks: Sequence[Any]) -> Iterator[Any]:
    """Every param-and-grad buffer (dense and expert-parallel) of every DDP chunk."""
    for chunk in ddp_chunks:
        yield from chunk.buffers
        yield from chunk.expert_parallel_buffers


def _param_storages(buffer: Any) -> list[torch.UntypedStorage]:
    """A buffer's flat `param_data` (distributed optimizer), else its parameters' own storages."""
    if buffer.param_data is not None:
        return _unique_storages([buffer.param_data])
    return _unique_storages(p.data for p in buffer.params)


def offload_grads(ddp_chunks: Sequence[Any]) -> int:
    """Free every DDP grad buffer (spent after the optimizer step; nothing is copied).

    Returns the bytes freed. Idempotent: a buffer already freed here is skipped.
    """
    freed = 0
    for buffer in _buffers(ddp_chunks):
        state = offload_state(buffer)
        if state.grads_offloaded or buffer.grad_data is None:
            continue
        storage = buffer.grad_data.untyped_storage()
        if storage.nbytes() == 0:
            continue
        if buffer.param_data is not None and (
            buffer.param_data.untyped_storage().data_ptr() == storage.data_ptr()
        ):
            log.debug("grad buffer shares its storage with the params; not freed")
            continue
        state.grads.append(_free(storage, copy=False))
        freed += state.grads[-1].nbytes
    return freed


def onload_grads(ddp_chunks: Sequence[Any]) -> int:
    """Re-allocate the grad buffers freed by `offload_grads`, zeroed. Returns the bytes restored."""
    restored = 0
    for buffer in _buffers(ddp_chunks):
        state = offload_state(buffer)
        for slot in state.grads:
            _restore(slot)
            restored += slot.nbytes
        state.grads = []
    return restored


def offload_params(ddp_chunks: Sequence[Any], *, force: bool = False) -> int:
    """Copy the parameters' storage to host memory (pinned on CUDA) and free it on the device.

    Host-resident parameters (a CPU run) are left alone unless `force`. Returns the bytes moved.
    Idempotent. Call it once the weights are exported: until `onload_params` the parameters are
    storage-less.
    """
    slots: list[_Slot] = []
    for buffer in _buffers(ddp_chunks):
        state = offload_state(buffer)
        if state.params_offloaded:
            continue
        for storage in _param_storages(buffer):
            if force or not _on_host(storage):
                state.params.append(_free(storage, copy=True))
                slots.append(state.params[-1])
    _wait(slots)
    return sum(s.nbytes for s in slots)


def onload_params(ddp_chunks: Sequence[Any]) -> int:
    """Bring back what `offload_params` moved (bit for bit). Returns the bytes restored."""
    restored = 0
    for buffer in _buffers(ddp_chunks):
        state = offload_state(buffer)
        for slot in state.params:
            _restore(slot)
            restored += slot.nbytes
        state.params = []
    return restored


# --- optimizer state ------------------------------------------------------------------------------


def _members(optimizer: Any) -> Iterator[Any]:
    """The Megatron optimizers inside `optimizer` (a ChainedOptimizer's members, recursively)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        yield optimizer
        return
    for member in chained:
        yield from _members(member)


def _optimizer_tensors(member: Any) -> Iterator[torch.Tensor]:
    """The member's tensors that are not model parameters: its fp32 main copies and its state."""
    for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
        for group in getattr(member, name, None) or ():
            yield from (p for p in group if p is not None)
    inner = getattr(member, "optimizer", None)
    if inner is None:  # a stub (a rank without parameters in this group)
        return
    for per_param in inner.state.values():
        yield from (v for v in per_param.values() if isinstance(v, torch.Tensor))


def offload_optimizer(optimizer: Any, *, force: bool = False) -> int:
    """Copy the optimizer's state and fp32 main params to host memory and free them on the device.

    `optimizer`: a Megatron optimizer or a ChainedOptimizer. Host-resident tensors (a CPU run, a
    non-fused Adam's `step`) are left alone unless `force`. Returns the bytes moved. Idempotent;
    before the first step the state is empty and only the main params move.
    """
    slots: list[_Slot] = []
    for member in _members(optimizer):
        state = offload_state(member)
        if state.optimizer_offloaded:
            continue
        for storage in _unique_storages(_optimizer_tensors(member)):
            if force or not _on_host(storage):
                state.optimizer.append(_free(storage, copy=True))
                slots.append(state.optimizer[-1])
    _wait(slots)
    return sum(s.nbytes for s in slots)


def onload_optimizer(optimizer: Any) -> int:
    """Bring back what `offload_optimizer` moved (bit for bit). Returns the bytes restored."""
    restored = 0
    for member in _members(optimizer):
        state = offload_state(member)
        for slot in state.optimizer:
            _restore(slot)
            restored += slot.nbytes
        state.optimizer = []
    return restored
