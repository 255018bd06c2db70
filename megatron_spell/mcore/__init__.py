"""Megatron-Core integration: the only package (with convert/) that imports megatron.

Submodules: cpu_support (CPU patches), parallel (ParallelContext), model (HF config -> GPTModel), and the
training-engine, checkpoint and export modules. Import submodules explicitly; this package imports nothing
so that `import megatron_spell.mcore` stays cheap.
"""
