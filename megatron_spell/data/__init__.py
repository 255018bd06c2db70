"""Corpus loading, task split and domain sampling, history memory and the document curriculum
(docs/spell-algorithm.md §4, §7).

Imports none of megatron, vllm or torch.distributed (enforced by tests/unit/test_layering.py).
"""
