"""A tiny HF model taught to emit SPELL-parseable text, so end-to-end tests exercise every phase for real.

A random tiny model never writes a JSON question, so a SPELL round with it would stop at bad_format and no
update would ever see responder groups. `make_spell_policy(out_dir)` takes the tiny Llama of
`tests.helpers.tiny_models` and trains it (200 Adam steps on SPELL prompts of every role over random short
documents) to answer
ANY such prompt with one of two texts, each with probability ~1/2:

    ```json\\n{"question": "Which document names the city?", "answer": "Alpha"}\\n```\\nThe correct answer is Alpha [[YES]]
    ... the same with Beta ... [[NO]]

so that through real vLLM sampling the questioner's output parses, about half of the no-context answers match
(bad_ground), responder groups have reward variance, and verifier votes are valid but split. The result is
cached under `.cache/` by a hash of this file's settings.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

TARGETS = tuple(
    '```json\n{"question": "Which document names the city?", "answer": "' + name + '"}\n```\n'
    f"The correct answer is {name} [[{vote}]]"
    for name, vote in (("Alpha", "YES"), ("Beta", "NO"))
)
SETTINGS = {"targets": TARGETS, "steps": 200, "lr": 3e-3, "seed": 0, "v": 2}
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "city",
    "river",
    "bridge",
    "town",
    "built",
    "year",
    "library",
    "mayor",
    "village",
    "north",
    "book",
    "garden",
]


def _random_prompt(rng) -> str:
    """A SPELL prompt of a random role and task over random short documents (the test distribution)."""
    from megatron_spell.spell import prompts

    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))).capitalize() + "."
        for _ in range(rng.randint(1, 4))
    ]
    task = rng.choice(["doc_general_qa", "doc_mc", "docmath_qa"])
    kind = rng.randint(0, 3)
    if kind == 0:
        return prompts.questioner_prompt(task, docs)
    if kind == 1:
        return prompts.responder_prompt(task, "\n".join(docs), "Which document names the city?")
    if kind == 2:
        return prompts.responder_prompt(task, prompts.NO_CONTEXT, "Which document names the city?")
    return prompts.verifier_prompt("Which document names the city?", rng.choice(WORDS), "Alpha")


CACHE = Path(__file__).resolve().parents[2] / ".cache"


def make_spell_policy(out_dir: str | Path | None = None) -> Path:
    """Return an HF directory of the trained tiny policy (built once, then cached)."""
    key = hashlib.sha1(json.dumps(SETTINGS, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(out_dir) if out_dir else CACHE / f"tiny-spell-policy-{key}"
    if (out / "DONE").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.tiny_models import make_tiny_hf_model

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_hf_model(tmp, "llama", seed=SETTINGS["seed"])
    tok = AutoTokenizer.from_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    targets = [
        tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        for t in SETTINGS["targets"]
    ]
    rng = random.Random(SETTINGS["seed"])
    opt = torch.optim.Adam(model.parameters(), lr=SETTINGS["lr"])
    model.train()
    for _ in range(SETTINGS["steps"]):
        batch, labels = [], []
        text = _random_prompt(rng)
        for target in targets:  # one sequence per target: equal weight, so p(Alpha) ~ p(Beta) ~ 1/2
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
            batch.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        width = max(len(b) for b in batch)
        ids = torch.tensor([b + [0] * (width - len(b)) for b in batch])
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp)
    (tmp / "DONE").write_text(f"final loss {loss.item():.4f}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
