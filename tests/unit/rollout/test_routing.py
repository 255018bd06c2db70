"""Routing capture bookkeeping (no vLLM): request ids, assembly, the prefix-cache fill, references."""

from __future__ import annotations

import pickle

import numpy as np

from megatron_spell.rollout.routing import (
    RoutingStore,
    assemble,
    missing_rows,
    request_key,
    routing_dtype,
    sentinel,
)
from megatron_spell.types import RoutedExperts


def test_request_key_parses_vllm_ids():
    assert request_key("3-a1b2c3d4", 1) == ("3", 0)
    assert request_key("2_3-a1b2c3d4", 4) == ("3", 2)


def test_dtype_and_sentinel():
    assert routing_dtype(128) == np.uint8 and sentinel(np.uint8) == 255
    assert routing_dtype(256) == np.int16 and sentinel(np.int16) == -1


def test_assemble_places_chunks_and_later_chunks_win():
    a = np.full((3, 2, 2), 1, np.uint8)
    b = np.full((2, 2, 2), 2, np.uint8)
    out = assemble([(0, a), (2, b)], 6, (2, 2), np.dtype(np.uint8))
    assert out[:2].max() == 1 and (out[2:4] == 2).all()
    assert missing_rows(out).tolist() == [False] * 4 + [True, True]


def _routing(n: int, value: int, missing: slice | None = None) -> np.ndarray:
    r = np.full((n, 1, 2), value, np.uint8)
    if missing is not None:
        r[missing] = 255
    return r


def test_store_fills_cached_blocks_from_the_request_that_computed_them():
    store = RoutingStore(block_size=4)
    shared = np.arange(8)
    computed = (np.concatenate([shared, [50, 51]]), _routing(10, 1))
    # a sibling whose first two blocks came from the prefix cache
    cached = (np.concatenate([shared, [60]]), _routing(9, 2, slice(0, 8)))
    # same second block of tokens, different first block: another prefix, not filled
    other = (np.concatenate([np.arange(10, 14), shared[4:], [7]]), _routing(9, 3, slice(0, 8)))
    store.fill([computed, cached, other])
    assert (cached[1][:8] == 1).all() and (cached[1][8] == 2).all()
    assert missing_rows(other[1]).sum() == 8
    # a later call (same engine, weights unchanged) still finds the blocks
    later = (shared.copy(), _routing(8, 4, slice(0, 8)))
    store.fill([later])
    assert (later[1] == 1).all()
    store.clear()
    again = (shared.copy(), _routing(8, 4, slice(0, 8)))
    store.fill([again])
    assert missing_rows(again[1]).all()


def test_routed_experts_pickle_as_a_reference():
    data = np.arange(7, 7 + 64, dtype=np.uint8).reshape(32, 1, 2)
    ref = RoutedExperts(0, data=data)
    blob = pickle.dumps(ref)
    assert len(blob) < 200 and data.tobytes() not in blob
    back = pickle.loads(blob)
    assert back.owner == 0 and back.data is data  # the owner process resolves it
    foreign = RoutedExperts(5, key=ref.key)  # another rank's reference with the same key
    assert foreign.data is None
    RoutedExperts.release_all()
    assert back.data is None
