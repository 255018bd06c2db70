"""The SPELL algorithm as pure functions: prompts, parsing, scorers, votes, rewards, batching, advantages.

Imports none of megatron, vllm or torch.distributed (enforced by tests/unit/test_layering.py).
"""
