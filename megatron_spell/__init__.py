"""megatron_spell: SPELL self-play RL for long-context LLMs on Megatron-Core and vLLM."""

__version__ = "0.1.0"
