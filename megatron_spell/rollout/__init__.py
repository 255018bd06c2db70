"""Rollouts in vLLM (the only package importing vllm): colocated engine, lockstep generation across
ranks (`lockstep.py`), weight receiver, metrics."""
