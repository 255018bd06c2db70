"""Parallel context: initialise torch.distributed and Megatron's parallel state from a ParallelConfig.

`init_parallel` is the one place that calls `megatron.core.parallel_state.initialize_model_parallel` (and
the one production call of the CPU patches, `cpu_support.apply_cpu_patches`); it returns a frozen
`ParallelContext` holding the layout, this rank's coordinates and the torch process groups, which our
distributed code takes as arguments instead of reading `parallel_state` globals.

Deviations: Megatron keeps its groups in module globals, so only one context can be live per process;
`init_parallel` tears down a previous one first. The backend is gloo without CUDA, nccl with it.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_spell.config import ParallelConfig
from megatron_spell.mcore.cpu_support import apply_cpu_patches

logger = logging.getLogger(__name__)

_OWNS_DIST = (
    False  # whether init_parallel created the default process group (destroy_parallel ends it)
)


@dataclass(frozen=True)
class ParallelContext:
    """The parallel layout of this job, this rank's coordinates and its process groups.

    `parallel_config` is the layout it was built from; tp/pp/cp/ep/sequence_parallel read it. dp is the
    data-parallel size without CP (world / (tp * pp * cp)); etp is the expert-TP size (tp when unset);
    vpp is the number of model chunks per pipeline rank (1 when not interleaved). dp_cp_group spans
    DP x CP (the group over which gradients are reduced). `pg_collection` is Megatron's
    ProcessGroupCollection of the same groups, passed to GPTModel, DDP and the optimizer.
    """

    parallel_config: ParallelConfig
    dp: int
    etp: int
    vpp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    ep_rank: int
    tp_group: dist.ProcessGroup = field(repr=False)
    pp_group: dist.ProcessGroup = field(repr=False)
    cp_group: dist.ProcessGroup = field(repr=False)
    dp_group: dist.ProcessGroup = field(repr=False)
    dp_cp_group: dist.ProcessGroup = field(repr=False)
    ep_group: dist.ProcessGroup = field(repr=False)
    mp_group: dist.ProcessGroup = field(repr=False)
    etp_group: dist.ProcessGroup | None = field(repr=False, default=None)
    expt_dp_group: dist.ProcessGroup | None = field(repr=False, default=None)
    pg_collection: ProcessGroupCollection | None = field(repr=False, default=None)

    @property
    def tp(self) -> int:
        return self.parallel_config.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel_config.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.parallel_config.context_parallel_size

    @property
    def ep(self) -> int:
        return self.parallel_config.expert_model_parallel_size

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.parallel_config.sequence_parallel)

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def holds_first_stage(self, vp_stage: int | None) -> bool:
        """Whether model chunk `vp_stage` (None: not interleaved) is the pipeline's first stage."""
        return self.is_first_pp_stage and (vp_stage is None or vp_stage == 0)

    def holds_last_stage(self, vp_stage: int | None) -> bool:
        """Whether model chunk `vp_stage` (None: not interleaved) is the pipeline's last stage."""
        return self.is_last_pp_stage and (vp_stage is None or vp_stage == self.vpp - 1)

    @property
    def device(self) -> torch.device:
        """This rank's device: the current CUDA device, or the CPU without CUDA."""
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _init_torch_distributed() -> None:
    """Initialise the default process group from the launcher's env (torchrun / Slurm) if needed."""
    global _OWNS_DIST
    if dist.is_initialized():
        return
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Single process without a launcher: a private one-rank group.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    elif missing:
        raise ValueError(f"torch.distributed launcher env incomplete: missing {missing}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    _OWNS_DIST = True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _validate(parallel: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"parallel: world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {tp}x{pp}x{cp}; "
            "change the sizes or the number of processes"
        )
    dp = world_size // (tp * pp * cp)
    if (dp * cp * tp) % (ep * etp) != 0:
        raise ValueError(
            f"parallel: expert_model_parallel_size x expert_tensor_parallel_size = {ep}x{etp} must divide "
            f"data x context x tensor parallel size {dp}x{cp}x{tp}; lower expert_model_parallel_size"
        )
    return dp, etp, tp


def init_parallel(parallel: ParallelConfig, *, seed: int = 0) -> ParallelContext:
    """Initialise torch.distributed (if needed), Megatron's parallel state and RNG; return the context.

    Applies the CPU patches first (a no-op with CUDA): every Megatron run of ours starts here.
    """
    apply_cpu_patches()
    _init_torch_distributed()
    world_size = dist.get_world_size()
    dp, etp, tp = _validate(parallel, world_size)
    vpp = parallel.virtual_pipeline_model_parallel_size
    vpp = vpp if vpp is not None and vpp > 1 else None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=etp,
    )
    torch.manual_seed(seed)
    # On GPU: per-TP-rank CUDA RNG streams; on CPU (patched): torch.manual_seed + no-op tracker.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ctx = _context_from_parallel_state(parallel, dp=dp, etp=etp, vpp=vpp or 1)
    logger.info("parallel context: %s", ctx)
    return ctx


def _context_from_parallel_state(
    parallel: ParallelConfig, *, dp: int, etp: int, vpp: int
) -> ParallelContext:
    return ParallelContext(
        parallel_config=parallel,
        etp=etp,
        dp=dp,
        vpp=vpp,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=False),
        ep_rank=ps.get_expert_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=False),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        ep_group=ps.get_expert_model_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        expt_dp_group=ps.get_expert_data_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state (and the default group if init_parallel created it)."""
    global _OWNS_DIST
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _OWNS_DIST and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_DIST = False
