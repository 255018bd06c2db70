"""Benchmark one packed policy-gradient training step: Megatron engine vs a plain HF transformers step.

    python tools/bench_train_step.py --model tiny --seq-lens 256,512 --num-seqs 4 --steps 3
    python tools/bench_train_step.py --model qwen3-0.6b --seq-lens 8192,32768 --peak-tflops 989 --dtype bf16
    torchrun --nproc-per-node 2 tools/bench_train_step.py --model tiny --tp 2     (Megatron side only)
    python tools/bench_train_step.py --shared-prefix --prompt-len 4096 --response-len 256 --group-size 8

Builds a model of the given HF-config shape (a preset, a config.json path or a JSON string) with random
weights, and for each sequence length runs `--steps` timed GRPO steps (after one warm-up) on the same
synthetic batch: `--num-seqs` sequences of that length, the last `--response-frac` of each being the
response. Prints, side by side, tokens/s, model FLOPs utilisation (given `--peak-tflops` of the device) and
peak memory for

- megatron: `megatron_spell.mcore.train_step.PolicyEngine` (THD packing, chunked vocab-parallel log-probs,
  PPO loss, Megatron DDP + optimizer), world size / TP / CP / SP from the launcher and flags;
- hf: transformers AutoModelForCausalLM (sdpa attention), one sequence per forward, full fp32 logits,
  log_softmax / T, the same PPO loss, AdamW: the reference's actor step without FSDP.

FLOPs per step (the same formula for both, so MFU ratios equal throughput ratios): 6 x non-embedding params
x tokens + 6 x layers x L^2 x q_dim per sequence (causal attention) + 6 x vocab x hidden x response tokens.
Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process peak RSS increase (coarse).

`--shared-prefix` instead runs one update of a responder-shaped batch (`--groups` groups of
`--group-size` responses of `--response-len` tokens to one `--prompt-len`-token prompt each; response
lengths vary by up to 1/8 below R so that units are ragged) packed unshared and with the shared prefix
(`train.shared_prefix`), on the same weights, in one process (Megatron side only, world size 1), and
prints for each the tokens through the model, micro-batches, wall time of the update and peak memory (GPU:
max allocated; CPU: peak RSS above the pre-step level, sampled every 2 ms), then the largest difference of
the loss and of any parameter's gradient. The last line is `shared-prefix speedup: X.XXx, max grad diff: Y`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, vocab_size=1024, tie_word_embeddings=False,
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=1536, vocab_size=32768, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
}  # fmt: skip


def hf_config(spec: str, max_len: int):
    from transformers import Qwen3Config

    if spec in PRESETS:
        fields = dict(PRESETS[spec])
    elif Path(spec).is_file():
        fields = json.loads(Path(spec).read_text())
    else:
        fields = json.loads(spec)
    fields.setdefault("max_position_embeddings", max(max_len, 4096))
    fields.setdefault("rms_norm_eps", 1e-6)
    fields.update(architectures=["Qwen3ForCausalLM"], hidden_act="silu", attention_bias=False)
    return Qwen3Config(**{k: v for k, v in fields.items() if k != "model_type"})


def step_flops(cfg, seq_len: int, num_seqs: int, response: int) -> float:
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * cfg.intermediate_size
    tokens = seq_len * num_seqs
    dense = 6 * layers * per_layer * tokens
    attention = 6 * layers * seq_len * seq_len * q_dim * num_seqs
    head = 6 * cfg.vocab_size * h * response * num_seqs
    return float(dense + attention + head)


def batch(cfg, seq_len: int, num_seqs: int, response: int, seed: int = 0):
    import torch

    from megatron_spell.mcore.packing import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_seqs):
        ids = torch.randint(0, cfg.vocab_size, (seq_len,), generator=g).tolist()
        out.append(
            TrainSample(
                prompt_ids=ids[: seq_len - response],
                response_ids=ids[seq_len - response :],
                advantage=1.0 if i % 2 == 0 else -1.0,
                old_logprobs=[-(float(cfg.vocab_size) ** 0.5) / 10] * response,
            )
        )
    return out


class Meter:
    """Peak memory (bytes) of a measured region."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss0


def run_megatron(cfg, args, samples_by_len, dtype):
    import torch

    from megatron_spell.config import ParallelConfig, TrainConfig
    from megatron_spell.mcore.attention import core_attention_class
    from megatron_spell.mcore.model import build_model, use_transformer_engine
    from megatron_spell.mcore.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_spell.mcore.parallel import init_parallel
    from megatron_spell.mcore.train_step import PolicyEngine

    par = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        context_parallel_size=args.cp, sequence_parallel=args.sp,
    )  # fmt: skip
    ctx = init_parallel(par)
    overrides = {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }
    use_te = use_transformer_engine("auto")
    models = build_model(
        cfg, ctx, dtype=dtype, core_attention=core_attention_class(use_te),
        config_overrides=overrides if args.recompute else None, use_te=use_te,
    )  # fmt: skip
    ddp = wrap_ddp(models, ctx, use_distributed_optimizer=True)
    max_len = max(samples_by_len)
    train = TrainConfig(
        lr=1e-6, use_distributed_optimizer=True, logprob_chunk_size=args.chunk,
        max_tokens_per_microbatch=max(args.budget, max_len // args.cp + 2 * args.cp * args.tp),
    )  # fmt: skip
    opt = build_optimizer(ddp, train, ctx)
    engine = PolicyEngine(
        ddp, ctx, train, temperature=0.7, vocab_size=cfg.vocab_size, pad_token_id=0,
        optimizer=opt, scheduler=build_scheduler(opt, train),
    )  # fmt: skip
    results = {}
    for seq_len, samples in samples_by_len.items():
        results[seq_len] = timed(
            lambda s=samples: engine.train_step(s), args.steps, torch.cuda.is_available()
        )
    return results, ctx


def run_hf(cfg, args, samples_by_len, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_spell.config import TrainConfig
    from megatron_spell.mcore.loss import policy_loss

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    loss_cfg = TrainConfig()

    def step(samples):
        n = sum(len(s.response_ids) for s in samples)
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids], device=dev)
            p, r = len(s.prompt_ids), len(s.response_ids)
            logits = model(ids).logits[0, p - 1 : p - 1 + r].float() / 0.7
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, p:, None]).squeeze(-1)
            old = torch.tensor(s.old_logprobs, device=dev)
            adv = torch.full((r,), s.advantage, device=dev)
            loss, _ = policy_loss(lp, old, adv, torch.full((r,), 1.0 / n, device=dev), loss_cfg)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {
        L: timed(lambda s=s: step(s), args.steps, dev == "cuda") for L, s in samples_by_len.items()
    }


def timed(fn, steps: int, cuda: bool) -> dict:
    import torch

    fn()  # warm-up
    with Meter(cuda) as m:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "peak_bytes": m.peak}


class RssPeak:
    """Peak resident memory (bytes) above the level at entry, sampled by a thread (CPU, Linux)."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss()) - self.base


def responder_batch(cfg, args):
    import torch

    from megatron_spell.mcore.packing import TrainSample

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.groups):
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
        for i in range(args.group_size):
            r = args.response_len - (i * args.response_len) // (8 * args.group_size)
            out.append(
                TrainSample(
                    prompt_ids=prompt,
                    response_ids=torch.randint(0, cfg.vocab_size, (r,), generator=g).tolist(),
                    advantage=1.0 if i % 2 == 0 else -1.0,
                    old_logprobs=(-torch.rand(r, generator=g) * 3 - 5).tolist(),
                )
            )
    return out


def run_shared_prefix(cfg, args, dtype) -> int:
    """Unshared vs shared-prefix packing of one responder-shaped update on the same weights."""
    import torch

    from megatron_spell.config import ParallelConfig, TrainConfig
    from megatron_spell.mcore.attention import PackedCPAttention
    from megatron_spell.mcore.model import build_model
    from megatron_spell.mcore.optimizer import build_optimizer, wrap_ddp
    from megatron_spell.mcore.parallel import init_parallel
    from megatron_spell.mcore.train_step import PolicyEngine

    cuda = torch.cuda.is_available()
    ctx = init_parallel(ParallelConfig())
    models = build_model(cfg, ctx, dtype=dtype, core_attention=PackedCPAttention, use_te=False)
    ddp = wrap_ddp(models, ctx, use_distributed_optimizer=False)
    samples = responder_batch(cfg, args)
    longest = args.prompt_len + args.response_len
    budget = max(args.budget, args.prompt_len + args.group_size * args.response_len)
    train = TrainConfig(
        lr=1e-6, use_distributed_optimizer=False, logprob_chunk_size=args.chunk,
        max_tokens_per_microbatch=max(budget, longest), recompute="none",
    )  # fmt: skip
    opt = build_optimizer(ddp, train, ctx)
    params = [p for m in ddp for p in m.parameters()]
    start = [p.detach().clone() for p in params]

    def update(shared: bool, batch: list) -> dict:
        engine = PolicyEngine(
            ddp, ctx, train, temperature=0.7, vocab_size=cfg.vocab_size, pad_token_id=0,
            optimizer=opt, shared_prefix=shared,
        )  # fmt: skip
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        meter = Meter(True) if cuda else RssPeak()
        with meter:
            t0 = time.perf_counter()
            metrics = engine.train_step(batch)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        grads = [p.main_grad.detach().float().clone() for p in params]
        return {"metrics": metrics, "wall": wall, "peak": meter.peak, "grads": grads}

    # warm-up (kernels, allocator, lazy init) on two responses, then the measured updates
    update(False, samples[:2])
    update(True, samples[:2])
    runs = {"unshared": update(False, samples), "shared": update(True, samples)}
    if ctx.rank != 0:
        return 0
    print(
        f"model={args.model} dtype={args.dtype} groups={args.groups} n={args.group_size} "
        f"P={args.prompt_len} R={args.response_len} (responses {args.response_len * 7 // 8}.."
        f"{args.response_len} tokens)"
    )
    print(f"{'packing':>9} {'tokens':>8} {'micro':>6} {'wall_s':>8} {'peak_MiB':>9} {'loss':>12}")
    for name, r in runs.items():
        m = r["metrics"]
        print(
            f"{name:>9} {m['train/num_model_tokens']:>8.0f} {m['train/num_microbatches']:>6.0f} "
            f"{r['wall']:>8.3f} {r['peak'] / 2**20:>9.0f} {m['train/loss']:>12.8f}"
        )
    a, b = runs["unshared"], runs["shared"]
    loss_diff = abs(a["metrics"]["train/loss"] - b["metrics"]["train/loss"])
    grad_diff = max(float((x - y).abs().max()) for x, y in zip(a["grads"], b["grads"]))
    grad_max = max(float(x.abs().max()) for x in a["grads"])
    print(f"max |loss diff| {loss_diff:.3e}; max |grad diff| {grad_diff:.3e}", end=" ")
    print(f"(largest |grad| {grad_max:.3e})")
    if not cuda:
        print("CPU: peak_MiB is the resident memory above the level before the update")
    print(f"shared-prefix speedup: {a['wall'] / b['wall']:.2f}x, max grad diff: {grad_diff:.3e}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="tiny", help=f"preset {sorted(PRESETS)}, config.json or JSON"
    )
    ap.add_argument("--seq-lens", default="256,512", help="comma-separated sequence lengths")
    ap.add_argument("--num-seqs", type=int, default=2, help="sequences per step")
    ap.add_argument("--response-frac", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak (dense bf16) TFLOP/s"
    )
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--budget", type=int, default=16384, help="max tokens per micro-batch per rank")
    ap.add_argument("--chunk", type=int, default=1024, help="logprob chunk size")
    ap.add_argument("--recompute", action="store_true", help="full activation recompute")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    ap.add_argument(
        "--hf-only", action="store_true", help="only the HF baseline (a clean CPU peak RSS for it)"
    )
    ap.add_argument(
        "--shared-prefix",
        action="store_true",
        help="compare one responder-shaped update packed unshared vs with the shared prefix",
    )
    ap.add_argument("--prompt-len", type=int, default=4096, help="--shared-prefix: prompt tokens P")
    ap.add_argument(
        "--response-len", type=int, default=256, help="--shared-prefix: longest response R"
    )
    ap.add_argument("--group-size", type=int, default=8, help="--shared-prefix: responses n")
    ap.add_argument("--groups", type=int, default=1, help="--shared-prefix: groups in the batch")
    args = ap.parse_args(argv)

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.shared_prefix:
        return run_shared_prefix(
            hf_config(args.model, args.prompt_len + args.response_len), args, dtype
        )
    lens = [int(x) for x in args.seq_lens.split(",")]
    cfg = hf_config(args.model, max(lens))
    response = {L: max(1, int(L * args.response_frac)) for L in lens}
    samples = {L: batch(cfg, L, args.num_seqs, response[L]) for L in lens}
    if args.hf_only:
        mg, rank0, world = {}, True, 1
    else:
        mg, ctx = run_megatron(cfg, args, samples, dtype)
        rank0, world = ctx.rank == 0, ctx.world_size
    hf = run_hf(cfg, args, samples, dtype) if (not args.no_hf and world == 1) else {}
    if not rank0:
        return 0
    print(
        f"model={args.model} dtype={args.dtype} world={world} tp={args.tp} pp={args.pp} cp={args.cp}"
    )
    print(
        f"{'seq_len':>8} {'impl':>9} {'step_s':>9} {'tok/s':>10} {'tok/s/dev':>10} {'MFU%':>6} {'peak_MiB':>9}"
    )
    for L in lens:
        flops = step_flops(cfg, L, args.num_seqs, response[L])
        for name, res, devices in (("megatron", mg.get(L), world), ("hf", hf.get(L), 1)):
            if res is None:
                continue
            tps = L * args.num_seqs / res["step_s"]
            mfu = (
                100 * flops / res["step_s"] / (args.peak_tflops * 1e12 * devices)
                if args.peak_tflops
                else float("nan")
            )
            print(
                f"{L:>8} {name:>9} {res['step_s']:>9.3f} {tps:>10.0f} {tps / devices:>10.0f} "
                f"{mfu:>6.1f} {res['peak_bytes'] / 2**20:>9.0f}"
            )
    if not torch.cuda.is_available():
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            "CPU: peak_MiB is the growth of the process peak RSS (0 = below an earlier peak); "
            f"process peak RSS {rss:.0f} MiB (run --no-hf / --hf-only for one implementation's peak)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
