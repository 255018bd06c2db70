"""HF <-> Megatron-Core checkpoint conversion: tables, transforms, streaming APIs.

Importing this package does not import megatron; `megatron_spell.mcore.checkpoint` writes and reads the
Megatron distributed checkpoints, `megatron_spell.convert.smollm2` builds the real demo model.
"""

from megatron_spell.convert.stream import (
    canonical_megatron_name,
    expected_megatron_names,
    hf_to_megatron_state_dict,
    megatron_to_hf,
)
from megatron_spell.convert.tables import ArchFamily, get_family, supported_architectures

__all__ = [
    "ArchFamily",
    "canonical_megatron_name",
    "expected_megatron_names",
    "get_family",
    "hf_to_megatron_state_dict",
    "megatron_to_hf",
    "supported_architectures",
]
