"""load_checkpoint, and the checks that run before anything is read: files, tensor shapes, optimizer type.

Each check raises, naming what does not fit, while model and optimizer are still untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from torchmics.checkpoint.every_rank import ordinary_error
from torchmics.checkpoint.folders import METADATA_FILE, read_metadata
from torchmics.checkpoint.rank_files import load_residuals, load_rng
from torchmics.checkpoint.state_dicts import global_shapes, restore_train_state, train_state
from torchmics.checkpoint.verify import verify_checkpoint
from torchmics.sharding import topology_of


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) from ``path``; every rank calls it. Returns ``{"step", "extra"}``.

    Works for any world size and partition size: each rank reads the chunks overlapping its shards.
    Names and global shapes are checked against the model first, so an incompatible checkpoint raises
    before anything is modified. A failure while reading (damaged files, another optimizer type) can
    leave model and optimizer partly loaded: build them afresh before trying another checkpoint.

    RNG states are restored only on the world size they were saved with: they are per-rank streams,
    and rank ``r`` of another world size draws for different data, so carrying them over would only
    pretend to be reproducible.
    """
    topology_of(model)
    metadata = read_metadata(path)
    verify_checkpoint(path)
    _check_compatible(path, metadata["shapes"], global_shapes(get_model_state_dict(model)))
    state = train_state(model, optimizer)
    if optimizer is not None:
        _fit_optimizer_template(state["optim"], path)
    partly = "Model and optimizer may be partly loaded: build them afresh before loading another checkpoint."
    with ordinary_error(f"loading checkpoint {path}", partly):
        dcp.load(state, checkpoint_id=path)
    restore_train_state(model, optimizer, state)
    if metadata["world_size"] == dist.get_world_size():
        load_rng(path)
    elif dist.get_rank() == 0:
        warnings.warn(
            f"{path} was saved on {metadata['world_size']} ranks and is loaded on {dist.get_world_size()}: "
            "model and optimizer are restored, random number generators are not (they are per rank).",
            stacklevel=2,
        )
    load_residuals(path, model)
    return {"step": metadata["step"], "extra": metadata["extra"]}


def _fit_optimizer_template(optim_state: dict[str, Any], path: str) -> None:
    """Shape the optimizer's load template to the checkpoint, or raise if it holds another optimizer's state.

    A parameter that never had a gradient has no optimizer state when saved, but the template to load
    into is made by a zero step over every parameter; such a parameter stays stateless, as saved.
    """
    if not _holds_optimizer(path):
        raise ValueError(
            f"checkpoint {path} holds no optimizer state (it was saved with optimizer=None). Nothing was "
            "loaded. Load it without an optimizer (weights only), then train with a fresh optimizer."
        )
    saved = saved_optimizer_state(path)
    for name in [n for n in optim_state["state"] if n not in saved]:
        del optim_state["state"][name]
    needed = {key for state in optim_state["state"].values() for key in state}
    found = set().union(*saved.values()) if saved else set()
    if not needed <= found:
        raise ValueError(
            f"checkpoint {path} holds the state of another optimizer type ({', '.join(sorted(found))}; this "
            f"optimizer needs {', '.join(sorted(needed))}). Nothing was loaded. Load it with the optimizer "
            "type it was saved with, or without an optimizer (weights only)."
        )


def _holds_optimizer(path: str) -> bool:
    """Whether an optimizer was saved: its parameter groups are, even when no parameter has state yet."""
    return any(key.startswith("optim.") for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def saved_optimizer_state(path: str) -> dict[str, set[str]]:
    """The optimizer state names (``exp_avg``, ``momentum_buffer``...) saved for each parameter name."""
    prefix = "optim.state."
    saved: dict[str, set[str]] = {}
    for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata:
        if key.startswith(prefix):
            name, state = key[len(prefix):].rsplit(".", 1)
            saved.setdefault(name, set()).add(state)
    return saved


def _check_compatible(path: str, saved: dict[str, list[int]], model: dict[str, list[int]], show: int = 3) -> None:
    """Raise naming the first differing tensors (and both shapes) unless names and global shapes match."""
    problems = shape_differences(saved, model)
    if problems:
        more = f"; and {len(problems) - show} more" if len(problems) > show else ""
        raise ValueError(
            f"checkpoint {path} does not fit this model ({'; '.join(problems[:show])}{more}). Nothing was "
            f"loaded. Build the model from the config it was saved with ({METADATA_FILE} has its shapes "
            "and extra)."
        )


def shape_differences(saved: dict[str, list[int]], model: dict[str, list[int]]) -> list[str]:
    """One line per tensor whose name or global shape differs, in the model's order."""
    problems = []
    for name, shape in model.items():
        if name not in saved:
            problems.append(f"{name}: model {shape}, not in the checkpoint")
        elif saved[name] != shape:
            problems.append(f"{name}: checkpoint {saved[name]} vs model {shape}")
    problems += [f"{name}: checkpoint {shape}, not in the model" for name, shape in saved.items() if name not in model]
    return problems
