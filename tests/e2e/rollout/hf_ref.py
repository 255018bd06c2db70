"""HF transformers reference for rollout tests: greedy decoding and sampled-token logprobs at temperature T.

New weights are written as a full HF directory (config + tokenizer copied, safetensors replaced) and loaded
with `from_pretrained`, so transformers' own loading (including its fused Qwen3-MoE expert layout) is the
reference, not a hand-written state-dict copy.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_hf_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def write_hf_dir(
    src_dir: str | Path, out_dir: str | Path, tensors: dict[str, torch.Tensor]
) -> Path:
    """Copy `src_dir` (config, tokenizer) to `out_dir` with `tensors` as its weights."""
    out = Path(out_dir)
    shutil.copytree(src_dir, out, dirs_exist_ok=True)
    for f in out.glob("*.safetensors*"):
        f.unlink()
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def perturb(
    tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A deliberate weight change: every tensor plus scaled Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        for k, v in tensors.items()
    }


def load_hf(model_dir: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by explicit argmax (no EOS stop: vLLM is asked with ignore_eos)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def hf_token_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: Iterable[int], temperature: float
) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token given everything before it (float64)."""
    comp = list(completion)
    ids = torch.tensor([list(prompt) + comp])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(comp)[:, None])[:, 0]


@torch.no_grad()
def hf_routing(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """The experts the HF MoE model routes each token to: int64 [tokens, MoE layers, top-k], in
    score order (slot 0 the highest router logit)."""
    out = model(torch.tensor([token_ids]), output_router_logits=True)
    k = int(model.config.num_experts_per_tok)
    layers = [logits.topk(k, dim=-1, sorted=True).indices for logits in out.router_logits]
    return torch.stack(layers, dim=1)
