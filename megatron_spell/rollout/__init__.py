"""Rollouts in vLLM (the only package importing vllm): colocated engine, role-level generation and
phase transitions (`roles.py`), weight receiver, metrics."""
