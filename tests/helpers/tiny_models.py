"""Tiny random-initialised Hugging Face models (Llama, Qwen2, Qwen3, Qwen3-MoE) for tests.

`make_tiny_hf_model(out_dir, family)` writes a complete HF model directory: config.json, model.safetensors
(fp32) and a byte-level BPE tokenizer (trained here with `tokenizers` on a small built-in English text) saved as
a PreTrainedTokenizerFast with a ChatML chat template. Both transformers and vLLM (CPU) load it: head_dim is 32,
the smallest head size vLLM's CPU attention backend accepts.

Deliberate choices:
- Norm weights and biases are perturbed away from their HF defaults (ones / zeros), so a converter that drops
  or swaps a norm or bias tensor produces different logits instead of passing by accident.
- The weights std is raised from HF's 0.02 to 0.05 so that logits are not nearly uniform (a mapping error
  shows up as a large difference).
- The model vocabulary is 512 (>= the tokenizer's size, divisible by 128 so Megatron needs no vocab padding
  at small TP sizes).
- For model_type qwen2, transformers' AutoTokenizer returns its Qwen2Tokenizer, which replaces the saved
  pre-tokenizer with Qwen's (digits split one by one): ids differ from the llama/qwen3 directories for text
  with numbers, but encode/decode round-trips. Always tokenize through AutoTokenizer on the directory.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A long document is split into many small passages, and each
passage answers a different question about the same story. Reading carefully, the assistant finds the facts
that matter and writes a short answer. The correct answer is A. The correct answer is B. The correct answer
is C. The correct answer is D. Questions ask who, what, where, when, why and how many.
In the year 1987 the town of Riverside built a new bridge across the river. It was 240 meters long and it
opened on the 3rd of May. The mayor, Anna Lopez, cut the ribbon while 5,000 people watched. Two years later
a library was added near the north end of the bridge, with 12,000 books and a small garden.
Mathematics: 1 + 1 = 2, 2 * 3 = 6, 10 - 4 = 6, 81 / 9 = 9, and the square of 12 is 144. The sum of the
first ten numbers is 55. A train travels 60 kilometers in one hour, so it travels 150 kilometers in 2.5 hours.
The user asks a question and the assistant answers it. The system message says: you are a helpful assistant.
Please think step by step, then put the final answer in a box. The answer is \\boxed{42}.
Scientists study the weather, the oceans, the stars and the history of life on earth. Water boils at 100
degrees Celsius at sea level. The moon goes around the earth about once a month, and the earth goes around the
sun once a year. Plants need light, water and air to grow; animals need food and shelter.
<document> Chapter one begins in a quiet village. </document> <question> Where does chapter one begin?
</question> <answer> in a quiet village </answer> Yes. No. Maybe. True. False. Unknown.
"""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train a byte-level BPE tokenizer on the built-in corpus (cached; returns its JSON)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 16,  # leave room: the model vocab stays >= the tokenizer's size
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer() -> Any:
    """Return the tiny PreTrainedTokenizerFast (ChatML template, eos <|im_end|>, pad <|endoftext|>)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )


def _base_config(tokenizer: Any, tied: bool) -> dict[str, Any]:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "initializer_range": 0.05,
        "bos_token_id": pad,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
    }


def _config_for(family: str, tokenizer: Any, tied: bool, overrides: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    kw = _base_config(tokenizer, tied)
    if family == "llama":
        cls = LlamaConfig
        kw.update(attention_bias=False, mlp_bias=False)
    elif family == "qwen2":
        cls = Qwen2Config
        kw.pop("head_dim")  # Qwen2 derives head_dim = hidden / heads (= 32)
        kw.update(use_sliding_window=False)
    elif family == "qwen3":
        cls = Qwen3Config
        kw.update(attention_bias=False, use_sliding_window=False)
    elif family == "qwen3_moe":
        cls = Qwen3MoeConfig
        kw.update(
            attention_bias=False,
            use_sliding_window=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def _perturb_small_params(model: Any, seed: int) -> None:
    """Move 1-D params (norm weights, biases) away from their ones/zeros defaults, deterministically."""
    import torch

    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            noise = 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def _save_random_model(out: Path, config: Any, tokenizer: Any, seed: int) -> None:
    """Build a seeded random fp32 model of HF `config` and save it with `tokenizer` into `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_small_params(model, seed)
    model.eval()
    if model.generation_config is not None:
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
        model.generation_config.bos_token_id = config.bos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def make_tiny_hf_model(
    out_dir: str | Path,
    family: str,
    *,
    tied: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random-initialised fp32 HF model + tokenizer of `family` into `out_dir`; return the path.

    family: one of "llama", "qwen2", "qwen3", "qwen3_moe". `config_overrides` are passed to the HF config
    class (for example num_hidden_layers=4, or rope_scaling=...).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    if len(tokenizer) > VOCAB_SIZE:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens > model vocab {VOCAB_SIZE}")
    config = _config_for(family, tokenizer, tied, config_overrides)
    _save_random_model(out, config, tokenizer, seed)
    return out


# --- any registered model family ------------------------------------------------------------------

TINY_MOE = {"num_experts": 4, "topk": 2, "ffn_hidden_size": 64, "norm_topk_prob": True}


def tiny_family_config_kwargs(family: Any, *, tied: bool = False) -> dict[str, Any]:
    """HF config kwargs of a tiny model of a registered `ModelFamily` (megatron_spell/families.py).

    Built from the registry record alone: the shared tiny sizes, every rejected flag at its supported
    value, and (for an MoE family) 4 experts, top-2, in every layer, under the family's own field names.
    """
    kw = _base_config(make_tiny_tokenizer(), tied)
    kw.update({flag.name: flag.supported for flag in family.rejected})
    if family.moe is not None:
        kw.update({family.moe.num_experts[0]: TINY_MOE["num_experts"]})
        kw.update({getattr(family.moe, k): v for k, v in TINY_MOE.items() if k != "num_experts"})
        kw.update({family.moe.sparse_step: 1, family.moe.dense_layers: []})
    return kw


def make_tiny_family_model(
    out_dir: str | Path,
    family: Any,
    *,
    model_type: str | None = None,
    tied: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random-initialised fp32 HF model + tokenizer of a registered `ModelFamily`.

    model_type: the transformers model type that builds it (default: the family's first); config.json
    names the family's first architecture, so a renamed family keeps its own name there.
    """
    import json

    from transformers import AutoConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    kw = {**tiny_family_config_kwargs(family, tied=tied), **config_overrides}
    config = AutoConfig.for_model(model_type or family.model_types[0], **kw)
    _save_random_model(out, config, tokenizer, seed)
    path = out / "config.json"
    saved = json.loads(path.read_text())
    saved["architectures"] = [family.architectures[0]]
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return out


def renamed_family(base: Any) -> Any:
    """A throwaway copy of registered family `base` under a new name and architecture (not registered)."""
    import dataclasses

    return dataclasses.replace(
        base,
        name=f"renamed_{base.name}",
        architectures=(f"Renamed{base.architectures[0]}",),
        model_types=(f"renamed_{base.model_types[0]}",),
    )
