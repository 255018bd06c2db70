"""Benchmark the Megatron -> vLLM weight sync of SmolLM2-135M-Instruct against a plain memory copy.

    python tools/bench_weight_sync.py [--repeats 5] [--bucket-mb 512] [--json OUT.json]

One process, Megatron at TP=1 (fp32, filled from the HF weights through the converter's stream), a colocated
vLLM engine (fp32, in-process). Timed, median over `--repeats`:
  sync     export_hf_weights (bucketed HF-named tensors) streamed into RolloutEngine.load_weights
           (vLLM's in-place layerwise reload + prefix-cache reset): the number the RL loop pays per step;
  export   the export stream alone (consumed, discarded);
  load     load_weights from tensors already exported;
  memcpy   `dst.copy_(src)` of exactly the same tensors into preallocated buffers (the floor on this machine).
The figure is sync / memcpy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _build_megatron(hf_dir: Path):
    """TP=1 GPTModel filled from the HF tensors (full tensors: no sharding at TP=1)."""
    import torch

    from megatron_spell.config import ParallelConfig
    from megatron_spell.convert import canonical_megatron_name, hf_to_megatron_state_dict
    from megatron_spell.convert.hf_io import iter_hf_tensors
    from megatron_spell.mcore.model import build_model, load_hf_config, padded_vocab_size
    from megatron_spell.mcore.parallel import init_parallel

    ctx = init_parallel(ParallelConfig())
    hf_config = load_hf_config(hf_dir)
    (model,) = build_model(hf_config, ctx)
    params = {canonical_megatron_name(n): p for n, p in model.named_parameters()}
    stream = hf_to_megatron_state_dict(
        iter_hf_tensors(hf_dir), hf_config, padded_vocab_size=padded_vocab_size(hf_config, 1)
    )
    with torch.no_grad():
        for name, tensor in stream:
            params[name].copy_(tensor)
    return ctx, hf_config, model


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, lazy allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from megatron_spell.config import RolloutConfig
    from megatron_spell.convert.smollm2 import materialize_smollm2
    from megatron_spell.mcore.export import export_hf_weights
    from megatron_spell.rollout.engine import RolloutEngine

    hf_dir = materialize_smollm2()
    ctx, hf_config, model = _build_megatron(hf_dir)
    settings = RolloutConfig(
        temperature=1.0, top_p=1.0, max_prompt_length=64, max_response_length=16,
        kv_cache_gib=0.25, max_num_batched_tokens=None,
    )  # fmt: skip
    engine = RolloutEngine(hf_dir, settings, dtype="float32")

    def export():
        return export_hf_weights([model], ctx, hf_config, bucket_mb=args.bucket_mb)

    exported = [(n, t) for bucket in export() for n, t in bucket]
    num_bytes = sum(t.numel() * t.element_size() for _, t in exported)
    dst = [torch.empty_like(t) for _, t in exported]

    def memcpy() -> None:
        for d, (_, s) in zip(dst, exported, strict=True):
            d.copy_(s)

    def export_only() -> None:
        for _ in export():
            pass

    sync_stats = []

    def sync() -> None:
        sync_stats.append(engine.load_weights(export()))

    figures = {
        "memcpy_s": _median_time(memcpy, args.repeats),
        "export_s": _median_time(export_only, args.repeats),
        "load_s": _median_time(lambda: engine.load_weights([exported]), args.repeats),
        "sync_s": _median_time(sync, args.repeats),
    }
    figures.update(
        model="SmolLM2-135M-Instruct fp32",
        bytes=num_bytes,
        tensors=len(exported),
        bucket_mb=args.bucket_mb,
        threads=torch.get_num_threads(),
        sync_gb_per_s=num_bytes / 1e9 / figures["sync_s"],
        memcpy_gb_per_s=num_bytes / 1e9 / figures["memcpy_s"],
        ratio_sync_over_memcpy=figures["sync_s"] / figures["memcpy_s"],
    )
    print(
        f"SmolLM2-135M fp32: {len(exported)} tensors, {num_bytes / 1e6:.1f} MB, median of {args.repeats}"
    )
    for key in ("memcpy_s", "export_s", "load_s", "sync_s"):
        rate = num_bytes / 1e9 / figures[key]
        print(f"  {key[:-2]:<7} {figures[key]:8.3f} s  {rate:7.2f} GB/s")
    print(f"  ratio sync / memcpy = {figures['ratio_sync_over_memcpy']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the vLLM engine spawns helpers: the guard is required
    sys.exit(main())
