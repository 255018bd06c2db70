"""`python -m megatron_spell ...` is the same as the `megatron-spell` console script."""

from megatron_spell.cli import main

raise SystemExit(main())
