"""The names of dtypes in flags, config files and result records: one table for every command.

``train`` and ``bench`` run in ``TRAINING_DTYPES`` (fp16 would need loss scaling, which torchmics does not
do); the planner also models fp16 parameters, so its flags take every name here. The replica hop may
also be quantized (:mod:`torchmics.quantized`).
"""

from __future__ import annotations

import torch

from torchmics.quantized import Quantized

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAINING_DTYPES = ("fp32", "bf16")
QUANTIZED_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
REPLICA_HOP_FORMATS = (*TRAINING_DTYPES, *QUANTIZED_DTYPES)  # what the replica hop may cross the network in


def replica_hop_format(name: str | None, error_feedback: bool = True) -> torch.dtype | Quantized | None:
    """The replica hop's wire format from its flag name: a dtype, or a quantized format (``int8``, ``fp8``)."""
    if name is None:
        return None
    if name in QUANTIZED_DTYPES:
        return Quantized(QUANTIZED_DTYPES[name], error_feedback=error_feedback)
    return DTYPES[name]


def wire_bytes(name: str) -> float:
    """Bytes per gradient element of the replica hop format ``name`` (a quantized block's scale included)."""
    fmt = replica_hop_format(name)
    return fmt.bytes_per_element if isinstance(fmt, Quantized) else fmt.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the name a flag or a record uses."""
    return next(name for name, known in DTYPES.items() if known == dtype)
