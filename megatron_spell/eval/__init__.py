"""Evaluation of a model on long-document QA benchmarks with the SPELL protocol
(docs/spell-algorithm.md §8).

`formats` loads benchmark files, `protocol` generates and scores, `metrics` computes mean@n and the unbiased
pass@k, `report` writes the outputs, `cli` is `megatron-spell eval` / `python -m megatron_spell.eval`.
"""
