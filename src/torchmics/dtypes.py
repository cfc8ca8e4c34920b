"""The names of dtypes in flags, config files and result records: one table for every command.

``train`` and ``bench`` run in ``TRAINING_DTYPES`` (fp16 would need loss scaling, which torchmics does not
do); the planner also models fp16 parameters, so its flags take every name here.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAINING_DTYPES = ("fp32", "bf16")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the name a flag or a record uses."""
    return next(name for name, known in DTYPES.items() if known == dtype)
