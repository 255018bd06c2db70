"""`collectives.encode`/`decode`: the round results' wire format (docs/architecture.md "Collectives")."""

from __future__ import annotations

import pickle
import random

import pytest

from megatron_spell.collectives import MIN_ARRAY_LEN, decode, encode
from megatron_spell.types import Completion, Role, Task, Trajectory


def _trajectories(vocab: int, n: int = 8) -> list[Trajectory]:
    rng = random.Random(0)
    prompt = tuple(rng.randrange(vocab) for _ in range(5000))
    return [
        Trajectory(
            role=Role.RESPONDER,
            task=Task.DOC_GENERAL_QA,
            uid="q0",
            prompt_ids=prompt,  # one tuple shared by the group's n responses
            completion=Completion(
                token_ids=tuple(rng.randrange(vocab) for _ in range(300)),
                text="the answer is x",
                logprobs=tuple(-rng.random() for _ in range(300)),
                finish_reason="stop",
            ),
            reward=float(i % 2),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("vocab", [49152, 151936])
def test_round_trip_is_exact_and_keeps_shared_prompts_shared(vocab):
    trajs = _trajectories(vocab)
    back = decode(encode(trajs))
    assert back == trajs
    assert all(type(t) is int for t in back[0].prompt_ids)
    assert all(b.prompt_ids is back[0].prompt_ids for b in back)  # decoded once, shared


def test_ids_travel_in_the_narrowest_integer_type():
    small = _trajectories(49152)
    large = _trajectories(151936)
    ids = 5000 + 8 * 300  # the shared prompt once, then each completion
    # uint16 under 65536 ids, int32 above; the rest (text, logprobs) is the same size
    assert len(encode(large)) - len(encode(small)) == pytest.approx(2 * ids, abs=64)
    assert len(encode(small)) < len(pickle.dumps(small))


def test_what_is_not_an_int_tuple_pickles_as_it_is():
    obj = {
        "bools": (True,) * MIN_ARRAY_LEN,  # bool is an int subclass: must stay bool
        "floats": (0.5,) * MIN_ARRAY_LEN,
        "mixed": (1, "a") * MIN_ARRAY_LEN,
        "short": (1, 2, 3),
        "negative": tuple(range(-MIN_ARRAY_LEN, 0)),
        "huge": tuple(range(2**40, 2**40 + MIN_ARRAY_LEN)),
        "empty": (),
    }
    back = decode(encode(obj))
    assert back == obj
    assert type(back["bools"][0]) is bool
    assert decode(encode([])) == []
