"""Model and optimizer state as state dicts: sharded (DTensor) ones for DCP, a full one for export.

Both are keyed by the unwrapped model's names, so a checkpoint does not depend on how the model was
sharded, and exported weights load into the model without torchmics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from torchmics.optim import ReplicaShardedOptimizer
from torchmics.sharding import shard_state

MODEL_KEY = "model"  # top-level key of the model state in the DCP checkpoint; tensors are "model.<fqn>"


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded tensors on rank 0 (CPU); an empty dict on other ranks.

    Keys equal the unwrapped model's ``state_dict()`` keys: buffers, frozen and tied parameters
    included. Every rank must call it (it all-gathers each parameter, one at a time).
    """
    optimizer = shard_state(model).optimizer
    if optimizer is not None:  # replicas hold low-precision copies of the slices they do not own
        optimizer.synchronize_master_weights()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Sharded (DTensor) state dicts of model and optimizer, keyed by the unwrapped model's names."""
    _check_optimizer_of(model, optimizer)
    if isinstance(optimizer, ReplicaShardedOptimizer):
        optim_state = optimizer.sharded_state_dict()  # first: it synchronizes the master weights
        return {MODEL_KEY: get_model_state_dict(model), "optim": optim_state}
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    return {MODEL_KEY: model_state, "optim": optim_state}


def _check_optimizer_of(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The optimizer must step this model's parameters: another one's state has no names here (a bare KeyError)."""
    own = shard_state(model).optimizer
    if optimizer is None or optimizer is own:
        return
    if own is not None or isinstance(optimizer, ReplicaShardedOptimizer):
        raise ValueError(
            "this optimizer is not the one this model trains with: pass the model's own ReplicaShardedOptimizer "
            "(or, for a model sharded without shard_optimizer_across_replicas, an optimizer on its parameters)."
        )
    params = {id(p) for p in model.parameters()}
    if any(id(p) not in params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            "the optimizer holds parameters that are not this model's: build it on the sharded model's "
            "parameters (torch.optim.AdamW(model.parameters(), ...) after torchmics.shard) and pass that one."
        )


def restore_train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """Put the state dicts :func:`train_state` made, now filled by DCP, back into model and optimizer."""
    if isinstance(optimizer, ReplicaShardedOptimizer):
        set_model_state_dict(model, state[MODEL_KEY])
        optimizer.load_sharded_state_dict(state["optim"])
        return
    optimizers = [optimizer] if optimizer is not None else []
    # Not strict: parameters without saved optimizer state stay stateless (load.py fits the template);
    # the model's names and shapes were checked against the checkpoint before loading.
    set_state_dict(model, optimizers, model_state_dict=state[MODEL_KEY], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


def global_shapes(model_state: dict[str, Any]) -> dict[str, list[int]]:
    """Global shape of every tensor (a DTensor's ``shape`` is global, whatever the shard)."""
    return {name: list(t.shape) for name, t in model_state.items() if isinstance(t, torch.Tensor)}
