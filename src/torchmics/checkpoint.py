"""Checkpoints: sharded save/load through torch.distributed.checkpoint, and full (unsharded) export."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from torchmics.sharding import topology_of


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded tensors on rank 0 (CPU); an empty dict on other ranks.

    Keys equal the unwrapped model's ``state_dict()`` keys: buffers, frozen and tied parameters
    included. Every rank must call it (it all-gathers each parameter, one at a time).
    """
    topology_of(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
