"""`python -m megatron_spell.eval ...`: the same as `megatron-spell eval ...`."""

from megatron_spell.eval.cli import main

if __name__ == "__main__":  # the vLLM engine spawns processes: keep the guard
    raise SystemExit(main())
