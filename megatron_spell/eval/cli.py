"""`megatron-spell eval` / `python -m megatron_spell.eval`: evaluate an HF model with the SPELL protocol.

    python -m megatron_spell.eval --model HF_DIR --data FILE [--data FILE ...] --n 8 \
        --max-input-tokens 16384 --out DIR

Loads the files (`eval.formats`), starts the rollout engine (`rollout.engine.RolloutEngine`: vLLM, CPU or GPU,
`--tensor-parallel-size` passed through; under torchrun the world is split into tensor-parallel replicas that
share the questions), runs the protocol (`eval.protocol`, docs/spell-algorithm.md §8.1-§8.2) and
writes predictions, metrics, the markdown table and the pass@k plot (`eval.report`) to `--out`.
All user errors are ValueErrors raised before the engine starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from megatron_spell.eval.formats import FORMATS, load_all
from megatron_spell.eval.metrics import default_ks
from megatron_spell.eval.protocol import EvalSettings, evaluate
from megatron_spell.eval.report import TABLE, write_report
from megatron_spell.types import Task

logger = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the eval flags to `parser` (used by `megatron-spell eval` and `python -m megatron_spell.eval`)."""
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument(
        "--model", required=True, help="HF model directory (config, weights, tokenizer)"
    )
    io.add_argument("--data", action="append", required=True, help="benchmark file; repeatable")
    io.add_argument(
        "--format", choices=sorted(FORMATS), help="force the input format of every file"
    )
    io.add_argument(
        "--task", choices=[t.value for t in Task], help="force the task of every example"
    )
    io.add_argument("--limit", type=int, help="use only the first N examples of each file")
    io.add_argument("--out", required=True, help="output directory")
    s = parser.add_argument_group("protocol (docs/spell-algorithm.md §8.1)")
    s.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        default=8,
        help="samples per question (spell it --num-samples under torchrun, whose parser eats --n)",
    )
    s.add_argument("--max-input-tokens", type=int, default=16384, help="middle-truncation limit")
    s.add_argument("--max-new-tokens", type=int, default=10000, help="max response tokens")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument(
        "--ks", help="comma-separated k of pass@k (default: powers of two up to n, and n)"
    )
    s.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    e = parser.add_argument_group("engine")
    e.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel size")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    e.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU only: KV cache bound")
    e.add_argument("--seed", type=int, default=42, help="engine seed")
    e.add_argument("--dtype", default="auto", help="vLLM dtype: auto, float32, bfloat16, float16")
    j = parser.add_argument_group(
        "optional LLM judge (docs/spell-algorithm.md §8.2); final score = max(rule, judge)"
    )
    j.add_argument("--judge", choices=["none", "engine", "openai"], default="none")
    j.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    j.add_argument("--judge-model", help="model name sent to the judge endpoint")
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var with the API key")
    j.add_argument("--judge-max-tokens", type=int, default=1024)
    j.add_argument("--judge-workers", type=int, default=8, help="parallel requests to the endpoint")
    j.add_argument(
        "--judge-all", action="store_true", help="judge samples whose rule score is 1 too"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_ks(text: str | None, n: int) -> tuple[int, ...]:
    if not text:
        return default_ks(n)
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise ValueError(
            f"--ks {text!r}: expected comma-separated integers such as 1,2,4,8"
        ) from None
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"--ks {text!r}: every k must be in [1, --n={n}]")
    return ks


def _settings(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        n=args.n,
        max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        judge_all=args.judge_all,
    )


def _check_args(args: argparse.Namespace) -> None:
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model}: not an HF model directory (no config.json)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.judge == "openai" and not (args.judge_url and args.judge_model):
        raise ValueError("--judge openai needs --judge-url and --judge-model")
    hf = json.loads((model / "config.json").read_text())
    limit = hf.get("max_position_embeddings")
    if isinstance(limit, int) and args.max_input_tokens + args.max_new_tokens > limit:
        raise ValueError(
            f"--max-input-tokens {args.max_input_tokens} + --max-new-tokens {args.max_new_tokens} "
            f"exceeds the model's context ({limit} max_position_embeddings in {model}/config.json); "
            f"lower them, e.g. --max-input-tokens {max(limit - args.max_new_tokens, 1)}"
        )


# RolloutConfig field -> the eval flag that sets it (the engine's error messages name the flag)
ENGINE_FLAGS = {
    "max_prompt_length": "--max-input-tokens",
    "max_response_length": "--max-new-tokens",
    "tensor_parallel_size": "--tensor-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "kv_cache_gib": "--kv-cache-gib",
}


def engine_settings(args: argparse.Namespace) -> Any:
    """The engine's `RolloutConfig` from the eval flags; a bad flag is a ValueError naming it.

    Sampling (temperature, top-p) is passed with every generate call (eval.protocol, eval.judge), so
    the section's sampling defaults are never used here.
    """
    from megatron_spell.config import RolloutConfig

    judge_tokens = args.judge_max_tokens if args.judge == "engine" else 0
    values = {
        "max_prompt_length": args.max_input_tokens,
        "max_response_length": max(args.max_new_tokens, judge_tokens),
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_gib": args.kv_cache_gib,
    }
    try:
        return RolloutConfig(**values, seed=args.seed, max_num_batched_tokens=None)
    except ValueError as exc:  # "config rollout.NAME=VALUE: FIX" -> "FLAG VALUE: FIX"
        for name, flag in ENGINE_FLAGS.items():
            prefix = f"config rollout.{name}="
            if str(exc).startswith(prefix):
                fix = str(exc).split(": ", 1)[1]
                raise ValueError(
                    f"{flag} {getattr(args, flag[2:].replace('-', '_'))!r}: {fix}"
                ) from None
        raise


def build_engine(args: argparse.Namespace) -> Any:
    """Start the rollout engine for `args.model` with the eval's lengths."""
    from megatron_spell.rollout.engine import RolloutEngine

    return RolloutEngine(args.model, engine_settings(args), dtype=args.dtype, knobs=ENGINE_FLAGS)


def _init_distributed(tp: int) -> tuple[int, int, int]:
    """(rank, data-parallel rank, data-parallel size); initialises torch.distributed under torchrun.

    Under `torchrun --nproc-per-node W` each rank hosts one engine; consecutive groups of `tp` ranks form one
    tensor-parallel vLLM replica and the W / tp replicas split the questions between them.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    import torch
    import torch.distributed as dist

    if world % tp:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the world size {world}")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    return rank, rank // tp, world // tp


def _gather_rows(rows: list[dict[str, Any]], dp_size: int) -> list[dict[str, Any]]:
    """All ranks' rows in question order (rows carry their global `index`); identity without torchrun."""
    if dp_size == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return rows
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")  # object gathers on CPU whatever the main backend is
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows, group=group)
    seen: dict[int, dict[str, Any]] = {}
    for part in parts:  # tensor-parallel peers return the same rows; keep the replica leader's copy
        for row in part:
            seen.setdefault(row["index"], row)
    return [seen[i] for i in sorted(seen)]


def _judge(args: argparse.Namespace, engine: Any, tokenizer: Any) -> Any:
    if args.judge == "engine":
        from megatron_spell.eval.judge import EngineJudge

        return EngineJudge(
            engine,
            tokenizer,
            max_tokens=args.judge_max_tokens,
            max_input_tokens=args.max_input_tokens,
        )
    if args.judge == "openai":
        from megatron_spell.eval.judge import OpenAIJudge

        return OpenAIJudge(
            args.judge_url,
            args.judge_model,
            api_key=os.environ.get(args.judge_api_key_env),
            max_tokens=args.judge_max_tokens,
            workers=args.judge_workers,
        )
    return None


def run_eval(args: argparse.Namespace) -> int:
    """Run one evaluation from parsed flags; returns the process exit code (0 on success)."""
    settings = _settings(args)
    ks = _parse_ks(args.ks, args.n)
    _check_args(args)
    examples = load_all(args.data, format=args.format, task=args.task, limit=args.limit)
    if not examples:
        raise ValueError(f"--data {args.data}: no examples to evaluate")
    rank, dp_rank, dp_size = _init_distributed(args.tensor_parallel_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.monotonic()
    engine = build_engine(args)
    # An endpoint judge is called once per replica (by its first rank), the engine judge by all its ranks.
    tp_leader = rank % args.tensor_parallel_size == 0
    judge = _judge(args, engine, tokenizer) if tp_leader or args.judge == "engine" else None
    t1 = time.monotonic()
    indices = list(range(dp_rank, len(examples), dp_size))
    rows = evaluate(
        [examples[i] for i in indices],
        engine,
        tokenizer,
        settings,
        judge=judge,
        ks=ks,
        progress=not args.no_progress and rank == 0,
    )
    for i, row in zip(indices, rows, strict=True):
        row["index"] = i  # position in the loaded question list
        row["dp_rank"] = dp_rank  # which replica generated it
    rows = _gather_rows(rows, dp_size)
    t2 = time.monotonic()
    if rank != 0:
        return 0
    run_settings = {
        "model": str(args.model),
        "data": [str(d) for d in args.data],
        "ks": list(ks),
        "judge": args.judge,
        "tensor_parallel_size": args.tensor_parallel_size,
        "data_parallel_size": dp_size,
        "dtype": args.dtype,
        "seed": args.seed,
        **{k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "engine_start_s": round(t1 - t0, 2),
        "generate_and_score_s": round(t2 - t1, 2),
    }
    out = Path(args.out)
    write_report(rows, out, ks, run_settings)
    logger.info("evaluation done in %.1f s; table:\n%s", t2 - t0, (out / TABLE).read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m megatron_spell.eval`)."""
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = argparse.ArgumentParser(
        prog="python -m megatron_spell.eval", description=__doc__.splitlines()[0]
    )
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
