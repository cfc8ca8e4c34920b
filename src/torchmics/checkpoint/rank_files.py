"""What each rank saves for itself, beside DCP's shards: its RNG states and its error-feedback residuals.

Neither is a slice of a global tensor that DCP could reshard: each is one rank's own stream, so each
rank writes its own file (``rng/rank<r>.pt``, ``residuals/rank<r>.pt``) and reads it back only where it
means the same thing again.
"""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from torchmics.replica import units_of_params
from torchmics.sharding import shard_state
from torchmics.topology import current_device


def save_rank_files(checkpoint: str, model: nn.Module) -> None:
    """Write this rank's RNG states and, under a quantized hop with error feedback, its residuals."""
    _save_rng(checkpoint)
    hop = shard_state(model).quantized_hop
    if hop is not None and hop.format.error_feedback:
        os.makedirs(os.path.dirname(residual_file(checkpoint)), exist_ok=True)
        torch.save({"layout": _residual_layout(model), **hop.state_dict()}, residual_file(checkpoint))


def _residual_layout(model: nn.Module) -> list:
    """What decides which elements a rank's residuals stand for: world, partition size, the blocks, and
    the units (another wrapping, or another model, packs other parameters into each unit's residual)."""
    state = shard_state(model)
    topology, fmt = state.topology, state.quantized_hop.format
    units = [[p.to_local().numel() for p in params] for params in units_of_params(state.units)]
    return [topology.world_size, topology.partition_size, str(fmt.dtype), fmt.block_size, units]


def residual_file(checkpoint: str) -> str:
    return os.path.join(checkpoint, "residuals", f"rank{dist.get_rank()}.pt")


def load_residuals(checkpoint: str, model: nn.Module) -> None:
    """Restore this rank's residuals where they mean the same thing: same topology, format and units.

    A residual is what one rank's contributions to its replicas' chunks still owe; on another world
    size, partition size, block size or wrapping the chunks are other ones, so the residuals start from zero,
    which drops at most one step's rounding (the error a run without feedback makes every step).
    """
    hop = shard_state(model).quantized_hop
    if hop is None or not hop.format.error_feedback or not os.path.exists(residual_file(checkpoint)):
        return
    saved = torch.load(residual_file(checkpoint), weights_only=True)
    if saved["layout"] == _residual_layout(model):
        hop.load_state_dict(saved, current_device())
    elif dist.get_rank() == 0:
        warnings.warn(f"{checkpoint} holds error-feedback residuals of another topology, replica-hop format or "
                      "wrapping: "
                      "they start from zero (at most one step's quantization error is dropped).", stacklevel=3)


def rng_file(checkpoint: str) -> str:
    return os.path.join(checkpoint, "rng", f"rank{dist.get_rank()}.pt")


def _save_rng(checkpoint: str) -> None:
    """This rank's generator states, as plain tensors and numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    os.makedirs(os.path.dirname(rng_file(checkpoint)), exist_ok=True)
    torch.save(state, rng_file(checkpoint))


def load_rng(checkpoint: str) -> None:
    """Restore this rank's generator states (only on the world size they were saved with: see load.py)."""
    state = torch.load(rng_file(checkpoint), weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
