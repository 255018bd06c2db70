"""Train/rollout mismatch: vLLM's log-probs and expert choice against Megatron's on the same tokens.

    python tools/bench_mismatch.py                      # the tiny Qwen3-MoE test model (CPU)
    python tools/bench_mismatch.py --num-prompts 8 --n 4 --max-tokens 64   # more tokens
    python tools/bench_mismatch.py --dense-dir DIR      # also a dense HF model (e.g. SmolLM2)
    python tools/bench_mismatch.py --num-experts 128 --experts-per-token 8   # Qwen3-30B-A3B's routing

The defaults (4 prompts x 2 completions x up to 48 tokens) take under two minutes on 2 CPU cores,
most of it the two vLLM start-ups. Figures: docs/platform.md, "Train/rollout mismatch and routing replay".

For each rollout dtype (fp32, bf16) a vLLM engine (a subprocess each: one engine per process) samples
`--num-prompts` x `--n` completions at temperature 1 (top-p 1, so vLLM's processed log-probs are the
full softmax) with routing capture on (rollout/routing.py). Megatron (fp32, single process, from the
converted checkpoint of the same HF weights, shared-prefix packing as in training: the n
completions of a prompt form one unit) then scores the same tokens

- without replay: its own routers choose (rows "fp32 rollout" and "bf16 rollout");
- with the bf16 rollout's routing replayed (row "bf16 rollout + R3"), as train.routing_replay does.

Per row: mean and max |log p_train - log p_rollout| over the response tokens, and the fraction of
(response token, MoE layer) routings whose top-1 expert (Megatron's first choice vs vLLM's first
slot, which the capture stores in score order) differs and whose top-k set differs (with R3: the experts Megatron's routers used vs vLLM's).
A response token's routing is that of its position as input (the last response token is never
fed back, so it has none). For MoE it then splits the bf16 gap: the scored tokens whose input
position is routed differently by Megatron than by vLLM (in any MoE layer) against the rest, with
and without R3. The last line is `mismatch mean|delta|: bf16 X, bf16+R3 Y`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prompts(tokenizer, num: int) -> list[list[int]]:
    from megatron_spell.chat import render_user_turn

    topics = ["the bridge", "the library", "the river", "the mayor", "the garden", "the moon"]
    doc = "In the year 1987 the town of Riverside built a new bridge across the river. " * 3
    return [
        render_user_turn(tokenizer, doc + f"Tell me about {topics[i % 6]}.") for i in range(num)
    ]


def sample(args) -> None:
    """Subprocess: sample with vLLM at `args.dtype`, pickle prompts, tokens, log-probs, routing."""
    import numpy as np

    from megatron_spell.config import RolloutConfig
    from megatron_spell.families import is_moe_config
    from megatron_spell.rollout.engine import RolloutEngine

    moe = is_moe_config(json.loads((Path(args.hf_dir) / "config.json").read_text()))
    settings = RolloutConfig(
        temperature=1.0, top_p=1.0, max_prompt_length=512, max_response_length=args.max_tokens,
        kv_cache_gib=0.25, seed=args.seed, max_num_batched_tokens=None,
    )  # fmt: skip
    engine = RolloutEngine(args.hf_dir, settings, dtype=args.dtype, routing_replay=moe)
    prompts = _prompts(engine.tokenizer, args.num_prompts)
    out = engine.generate(prompts, args.n, max_tokens=args.max_tokens)
    rows = []
    for prompt, comps in zip(prompts, out):
        for c in comps:
            routing = None if c.routed_experts is None else np.asarray(c.routed_experts.data)
            rows.append((list(prompt), list(c.token_ids), list(c.logprobs), routing))
    Path(args.out).write_bytes(pickle.dumps(rows))


def _rollout(hf_dir: str, dtype: str, args, tmp: Path) -> list:
    out = tmp / f"rollout_{dtype}.pkl"
    cmd = [sys.executable, __file__, "--phase", "sample", "--hf-dir", hf_dir, "--dtype", dtype]
    cmd += ["--out", str(out), "--num-prompts", str(args.num_prompts), "--n", str(args.n)]
    cmd += ["--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"vLLM sampling at {dtype} failed:\n{done.stderr[-3000:]}")
    return pickle.loads(out.read_bytes())


def _convert(hf_dir: str, out: Path) -> str:
    from megatron_spell.mcore.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, str(out), progress=False)
    return str(out)


def _by_token(engine, samples) -> tuple[dict, dict]:
    """{(sample, token): expert ids [layers, topk]} and first choices [layers] of the last pass."""
    import torch

    from megatron_spell.mcore.replay import pack_tokens

    packed = engine.pack(samples)
    units = engine.plan(samples).units
    used, top1 = {}, {}
    for mb, (positions, ids), firsts in zip(
        packed.micro_batches, engine.replay.used, engine.replay.top1, strict=True
    ):
        tokens = pack_tokens(mb, samples, units)
        for row, p in enumerate(positions.tolist()):
            if p not in tokens:
                continue
            key = tokens[p]
            used[key] = torch.stack([ids[c][row] for c in sorted(ids)]).numpy()
            if firsts:
                top1[key] = torch.stack([firsts[c][row] for c in sorted(firsts)]).numpy()
    engine.replay.used.clear()
    engine.replay.top1.clear()
    return used, top1


def score(engine, rows, replay: bool) -> dict[str, float]:
    import numpy as np
    import torch

    from megatron_spell.mcore.packing import TrainSample

    samples = [
        TrainSample(prompt_ids=p, response_ids=r, routing=routing if replay else None)
        for p, r, _, routing in rows
    ]
    moe = engine.replay.enabled
    engine.replay.trace = moe
    lps = engine.compute_logprobs(samples)
    differ = engine.routing_prompt_differ
    delta = torch.cat([(lp - torch.tensor(v)).abs() for lp, (_, _, v, _) in zip(lps, rows)])
    out = {"mean": float(delta.mean()), "max": float(delta.max())}
    if moe:
        used, top1 = _by_token(engine, samples)
        first = k_set = count = 0
        for sid, (p, r, _, routing) in enumerate(rows):
            for tok in range(len(p), len(p) + len(r) - 1):  # response tokens with routing
                theirs = routing[tok].astype(np.int64)
                mine = used[(sid, tok)]
                count += theirs.shape[0]
                k_set += int((np.sort(mine, -1) != np.sort(theirs, -1)).any(-1).sum())
                mine_first = top1[(sid, tok)] if not replay else None
                if mine_first is None:  # replayed: Megatron's first choice is the given first slot
                    mine_first = mine[:, 0]
                first += int((mine_first != theirs[:, 0]).sum())
        out["top1_differs"], out["topk_differs"] = first / count, k_set / count
        # per scored token (the order of `delta`): does the routing of its input position (the
        # token before it) differ from vLLM's in any MoE layer?
        flips = []
        for sid, (p, r, _, routing) in enumerate(rows):
            for tok in range(len(p) - 1, len(p) - 1 + len(r)):
                theirs = np.sort(routing[tok].astype(np.int64), -1)
                own = np.sort(used[(sid, tok)], -1)
                flips.append(bool((own != theirs).any()) and not (routing[tok] == 255).any())
        out["flipped"] = torch.tensor(flips)
        out["delta"] = delta
    if replay:  # completions of a prompt whose prompt rows differ from the first's (replayed)
        out["prompt_differ"] = differ
    return out


def _engine(hf_dir: str, ckpt: str):
    from megatron_spell.config import ParallelConfig, TrainConfig
    from megatron_spell.families import is_moe_config
    from megatron_spell.mcore.attention import core_attention_class
    from megatron_spell.mcore.checkpoint import load_checkpoint
    from megatron_spell.mcore.model import build_model, load_hf_config
    from megatron_spell.mcore.parallel import init_parallel
    from megatron_spell.mcore.train_step import PolicyEngine

    hf = load_hf_config(hf_dir)
    ctx = init_parallel(ParallelConfig())
    moe = is_moe_config(hf)
    models = build_model(
        hf,
        ctx,
        core_attention=core_attention_class(False),
        config_overrides={"moe_enable_routing_replay": True} if moe else None,
        use_te=False,
    )
    load_checkpoint(models, ckpt)
    train = TrainConfig(max_tokens_per_microbatch=4096, logprob_chunk_size=256)
    engine = PolicyEngine(
        models, ctx, train, temperature=1.0, vocab_size=hf.vocab_size, pad_token_id=0
    )
    return engine


def _row(name: str, res: dict[str, float]) -> str:
    line = f"{name:<22} mean|delta| {res['mean']:.3e}  max|delta| {res['max']:.3e}"
    if "top1_differs" in res:
        line += (
            f"  top-1 differs {res['top1_differs']:.4f}  top-k differs {res['topk_differs']:.4f}"
        )
    if "prompt_differ" in res:
        line += f"  prompt rows differ {res['prompt_differ']}"
    return line


def bench(hf_dir: str, args, tmp: Path, label: str) -> tuple[dict, dict]:
    from megatron_spell.mcore.parallel import destroy_parallel

    fp32, bf16 = _rollout(hf_dir, "float32", args, tmp), _rollout(hf_dir, "bfloat16", args, tmp)
    engine = _engine(hf_dir, _convert(hf_dir, tmp / f"{label}_ckpt"))
    results = {
        "fp32 rollout": score(engine, fp32, False),
        "bf16 rollout": score(engine, bf16, False),
    }
    if engine.replay.enabled:
        results["bf16 rollout + R3"] = score(engine, bf16, True)
    destroy_parallel()
    n = sum(len(r) for _, r, _, _ in bf16)
    print(f"{label}: {len(bf16)} completions, {n} response tokens; Megatron fp32")
    for name, res in results.items():
        print("  " + _row(name, res))
    if engine.replay.enabled:  # where the gap comes from: tokens whose own routing flipped in bf16
        flip = results["bf16 rollout"]["flipped"]
        parts = []
        for name in ("bf16 rollout", "bf16 rollout + R3"):
            d = results[name]["delta"]
            at = float(d[flip].mean()) if flip.any() else float("nan")
            parts.append(f"{name}: {at:.3e} there, {float(d[~flip].mean()):.3e} elsewhere")
        print(
            f"  {int(flip.sum())} of {flip.numel()} tokens follow a routing that differs in bf16;"
        )
        print("  mean|delta| " + "; ".join(parts))
    return results["bf16 rollout"], results.get("bf16 rollout + R3", {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["bench", "sample"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument(
        "--hf-dir", help="MoE HF model directory (default: the tiny Qwen3-MoE test model)"
    )
    ap.add_argument("--dense-dir", help="also bench this dense HF model directory (e.g. SmolLM2)")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=2, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per completion, at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--num-experts", type=int, default=4, help="experts per MoE layer of the tiny model"
    )
    ap.add_argument(
        "--experts-per-token", type=int, default=2, help="top-k of the tiny model's router"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    if args.phase == "sample":
        sample(args)
        return 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hf_dir = args.hf_dir
        if hf_dir is None:
            from tests.helpers.tiny_models import make_tiny_hf_model

            routing = dict(num_experts=args.num_experts, num_experts_per_tok=args.experts_per_token)
            hf_dir = str(make_tiny_hf_model(tmp / "tiny_moe", "qwen3_moe", seed=3, **routing))
        bf16, r3 = bench(hf_dir, args, tmp, "moe")
        if args.dense_dir:
            bench(args.dense_dir, args, tmp, "dense")
    print(f"mismatch mean|delta|: bf16 {bf16['mean']:.3e}, bf16+R3 {r3['mean']:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
