"""The weight stream is buckets (what `MegatronPolicy.export_weights` yields), never guessed."""

import pytest
import torch

from megatron_spell.rollout.weights import flatten


def test_flatten_yields_bucket_pairs_in_order_and_rejects_bare_pairs():
    a, b, c = torch.zeros(1), torch.ones(2), torch.ones(3)
    assert [n for n, _ in flatten(iter([[("a", a), ("b", b)], [], [("c", c)]]))] == ["a", "b", "c"]
    with pytest.raises(TypeError, match="expected buckets .* got a tuple"):
        list(flatten([("a", a)]))
