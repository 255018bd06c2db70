"""Rollouts in vLLM (the only package importing vllm): colocated engine, weight receiver, metrics."""
