"""Checkpoints: sharded save/load through torch.distributed.checkpoint (DCP), and full (unsharded) export.

A checkpoint is a directory that every rank writes its own shards into; no rank ever holds the whole
model. DCP records each tensor's *global* shape and which chunk each file holds, so a checkpoint saved
with one world size or partition size loads with any other (it reads whichever chunks overlap the
shard a rank now owns). Layout of a run directory::

    run/
      latest                  name of the newest complete checkpoint ("step_200"), replaced atomically
      step_100/               one complete checkpoint
        .metadata             DCP's index: global shape of every tensor, where each chunk lives
        __<r>_0.distcp        rank r's shards of the model and optimizer states
        rng/rank<r>.pt        rank r's random number generator states
        hf_config.json        the Hugging Face config, when extra["model"] is "hf:<config>"
        torchmics.json        step, extra, topology, torch version, tensor shapes; written last
      step_200/
      step_300.tmp-1a2b3c4d/  an interrupted save: ignored by loading, safe to delete

A save writes into a temporary sibling directory and renames it to its final name only once every
rank has finished, then repoints ``latest``; a crash at any moment leaves the previous checkpoint and
``latest`` as they were. The directory must be on a file system every rank sees (for several nodes:
a shared one, e.g. NFS or Lustre).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from torchmics.optim import ReplicaShardedOptimizer
from torchmics.sharding import shard_state, topology_of
from torchmics.topology import Topology

METADATA_FILE = "torchmics.json"
LATEST_FILE = "latest"
HF_CONFIG_FILE = "hf_config.json"
_TEMP_MARK = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")
_MODEL_KEY = "model"  # top-level key of the model state in the DCP checkpoint; tensors are "model.<fqn>"

_T = TypeVar("_T")


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


def checkpoint_path(run_dir: str, step: int) -> str:
    """Where the checkpoint of ``step`` lives in ``run_dir``: the name :func:`latest_checkpoint` scans for."""
    return os.path.join(run_dir, f"step_{step}")


def save_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int, extra: dict | None = None
) -> None:
    """Save model, optimizer, RNG states and ``extra`` to the new directory ``path``; every rank calls it.

    Each rank writes only the shards it owns (DCP), so saving costs no gather and no extra memory.
    ``extra`` holds what resuming needs beyond tensors (data position, config) and must be
    JSON-serializable; put the model spec under ``extra["model"]`` so :func:`export_checkpoint` can
    write a Hugging Face directory for ``hf:`` models. ``path`` must not exist: a complete checkpoint
    is never overwritten. See the module docstring for why a crash mid-save is harmless.
    """
    topology = topology_of(model)
    extra = _check_json(extra or {})
    temp = _on_rank0(lambda: _begin_save(path, extra))
    state = _train_state(model, optimizer)
    unchanged = f"The previous checkpoint and `latest` are unchanged; {temp} can be deleted."
    with _ordinary_error(f"saving checkpoint {path}", unchanged):
        dcp.save(state, checkpoint_id=temp)
    _save_rng(temp)
    metadata = _metadata(step, extra, topology, state[_MODEL_KEY])
    dist.barrier()  # every rank's shards and RNG file are on disk before the checkpoint is published
    _on_rank0(lambda: _publish(temp, path, metadata))


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
    metadata = _read_metadata(path)
    _check_compatible(path, metadata["shapes"], _shapes(get_model_state_dict(model)))
    state = _train_state(model, optimizer)
    if optimizer is not None:
        _drop_state_never_saved(state["optim"], path)
    other_optimizer = "A missing `optim.` key means the checkpoint holds another optimizer type's state."
    with _ordinary_error(f"loading checkpoint {path}", other_optimizer):
        dcp.load(state, checkpoint_id=path)
    _restore_train_state(model, optimizer, state)
    if metadata["world_size"] == dist.get_world_size():
        _load_rng(path)
    elif dist.get_rank() == 0:
        warnings.warn(
            f"{path} was saved on {metadata['world_size']} ranks and is loaded on {dist.get_world_size()}: "
            "model and optimizer are restored, random number generators are not (they are per rank).",
            stacklevel=2,
        )
    return {"step": metadata["step"], "extra": metadata["extra"]}


def _drop_state_never_saved(optim_state: dict[str, Any], path: str) -> None:
    """Leave out of the load template the parameters that have no optimizer state in the checkpoint.

    A parameter that never had a gradient has no optimizer state when saved, but the template to load
    into is made by a zero step over every parameter; such a parameter stays stateless, as saved.
    """
    prefix = "optim.state."
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {key[len(prefix):].rsplit(".", 1)[0] for key in keys if key.startswith(prefix)}
    for name in [n for n in optim_state["state"] if n not in saved]:
        del optim_state["state"][name]


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint in ``run_dir``, or ``None`` (no run dir, or nothing saved yet).

    Reads the ``latest`` pointer; if it is missing or points at something incomplete, falls back to
    the complete ``step_<N>`` directory with the largest ``N``. Interrupted saves are never returned.
    """
    pointer = os.path.join(run_dir, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            candidate = os.path.join(run_dir, f.read().strip())
        if _is_complete(candidate):
            return candidate
    if not os.path.isdir(run_dir):
        return None
    steps = [
        (int(match.group(1)), name)
        for name in os.listdir(run_dir)
        if (match := _STEP_DIR.fullmatch(name)) and _is_complete(os.path.join(run_dir, name))
    ]
    return os.path.join(run_dir, max(steps)[1]) if steps else None


def export_checkpoint(path: str, to: str) -> None:
    """Write the full, unsharded model weights of checkpoint ``path`` as safetensors; no cluster needed.

    Runs in one process without a process group: DCP reads every chunk of every model tensor, the
    optimizer state is skipped. Keys are the unwrapped model's ``state_dict()`` keys. ``to`` ending in
    ``.safetensors`` is the file to write; anything else is a directory that gets ``model.safetensors``
    and, for a model saved with ``extra["model"] = "hf:<config>"``, its ``config.json``, so
    ``transformers.AutoModelForCausalLM.from_pretrained(to)`` loads it.
    """
    _read_metadata(path)
    weights = _read_model_weights(path)
    if to.endswith(".safetensors"):
        save_file(weights, to, metadata={"format": "pt"})
        return
    os.makedirs(to, exist_ok=True)
    save_file(weights, os.path.join(to, "model.safetensors"), metadata={"format": "pt"})
    hf_config = os.path.join(path, HF_CONFIG_FILE)
    if os.path.isfile(hf_config):
        shutil.copyfile(hf_config, os.path.join(to, "config.json"))


# ---- saving --------------------------------------------------------------------------------------


def _on_rank0(fn: Callable[[], _T]) -> _T:
    """Run a file-system step once, on rank 0, and hand every rank its result or raise its error everywhere.

    Checks and renames must happen once; broadcasting the outcome means a failure on rank 0 raises on
    every rank instead of leaving the others waiting forever in the next collective.
    """
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (True, fn())
        except Exception as err:  # re-raised below, on every rank
            outcome[0] = (False, err)
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _check_json(extra: dict) -> dict:
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"save_checkpoint(extra=...) must be JSON-serializable (dicts, lists, strings, numbers, bools, "
            f"None); convert other values first (e.g. tensor.item(), str(path)): {err}"
        ) from err
    return extra


def _refuse_existing(path: str) -> None:
    if os.path.exists(path):
        raise FileExistsError(
            f"checkpoint {path} already exists and is never overwritten; save under a new name "
            f"(e.g. checkpoint_path(run_dir, step)) or delete it first."
        )


def _begin_save(path: str, extra: dict) -> str:
    """Refuse an existing ``path`` or a missing HF config before writing anything; make the temp dir."""
    _refuse_existing(path)
    _hf_config_source(extra)
    temp = f"{os.path.normpath(path)}{_TEMP_MARK}{uuid.uuid4().hex[:8]}"
    os.makedirs(temp)
    return temp


def _hf_config_source(extra: dict) -> str | None:
    """The config.json behind ``extra["model"] = "hf:<config.json or folder>"``, or ``None``."""
    spec = extra.get("model")
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        return None
    source = spec.removeprefix("hf:")
    if os.path.isdir(source):
        source = os.path.join(source, "config.json")
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"extra['model'] = {spec!r} names no config file ({source} does not exist); the checkpoint "
            "keeps a copy of it for export. Pass the spec the model was built from."
        )
    return source


def _train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Sharded (DTensor) state dicts of model and optimizer, keyed by the unwrapped model's names."""
    if isinstance(optimizer, ReplicaShardedOptimizer):
        optim_state = optimizer.sharded_state_dict()  # first: it synchronizes the master weights
        return {_MODEL_KEY: get_model_state_dict(model), "optim": optim_state}
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    return {_MODEL_KEY: model_state, "optim": optim_state}


def _restore_train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    if isinstance(optimizer, ReplicaShardedOptimizer):
        set_model_state_dict(model, state[_MODEL_KEY])
        optimizer.load_sharded_state_dict(state["optim"])
        return
    optimizers = [optimizer] if optimizer is not None else []
    # Not strict: parameters without saved optimizer state stay stateless (_drop_state_never_saved);
    # the model's names and shapes were checked against the checkpoint before loading.
    set_state_dict(model, optimizers, model_state_dict=state[_MODEL_KEY], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


@contextlib.contextmanager
def _ordinary_error(action: str, advice: str) -> Iterator[None]:
    """Re-raise DCP's failures as a ``RuntimeError`` naming the action, each distinct cause and its ranks.

    DCP raises ``CheckpointException``, a ``BaseException`` that ``except Exception`` in a training
    loop would not catch; a failed save or an unsuitable checkpoint is an ordinary error.
    """
    try:
        yield
    except CheckpointException as err:
        ranks_by_cause: dict[str, list[int]] = {}
        for rank, (exc, _) in sorted(err.failures.items()):
            ranks_by_cause.setdefault(repr(exc), []).append(rank)
        causes = "; ".join(f"{_ranks(ranks)}: {cause}" for cause, ranks in ranks_by_cause.items())
        raise RuntimeError(f"{action} failed ({causes}). {advice}") from err


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"{len(ranks)} ranks (first {ranks[0]})"


def _shapes(model_state: dict[str, Any]) -> dict[str, list[int]]:
    """Global shape of every tensor (a DTensor's ``shape`` is global, whatever the shard)."""
    return {name: list(t.shape) for name, t in model_state.items() if isinstance(t, torch.Tensor)}


def _metadata(step: int, extra: dict, topology: Topology, model_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "extra": extra,
        "world_size": topology.world_size,
        "partition_size": topology.partition_size,
        "gpus_per_node": topology.gpus_per_node,
        "torch_version": torch.__version__,
        "shapes": _shapes(model_state),
    }


def _publish(temp: str, path: str, metadata: dict[str, Any]) -> None:
    """Complete the temp dir, rename it to ``path``, then repoint ``latest``: each step leaves a valid run."""
    _refuse_existing(path)  # another job may have taken the name since _begin_save
    source = _hf_config_source(metadata["extra"])
    if source is not None:
        shutil.copyfile(source, os.path.join(temp, HF_CONFIG_FILE))
    _write_atomic(os.path.join(temp, METADATA_FILE), json.dumps(metadata))
    os.rename(temp, path)
    run_dir, name = os.path.split(os.path.normpath(path))
    _write_atomic(os.path.join(run_dir, LATEST_FILE), name)


def _write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    temp = f"{path}{_TEMP_MARK}{uuid.uuid4().hex[:8]}"
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


# ---- RNG -----------------------------------------------------------------------------------------


def _rng_file(checkpoint: str) -> str:
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
    os.makedirs(os.path.dirname(_rng_file(checkpoint)), exist_ok=True)
    torch.save(state, _rng_file(checkpoint))


def _load_rng(checkpoint: str) -> None:
    state = torch.load(_rng_file(checkpoint), weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- loading -------------------------------------------------------------------------------------


def _is_complete(path: str) -> bool:
    """A finished save: not a temp dir, and it has the metadata file that is written last."""
    name = os.path.basename(os.path.normpath(path))
    return _TEMP_MARK not in name and os.path.isfile(os.path.join(path, METADATA_FILE))


def _read_metadata(path: str) -> dict[str, Any]:
    """The checkpoint's ``torchmics.json``; a clear error for a missing or interrupted checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no checkpoint at {path}; pass a directory written by save_checkpoint (latest_checkpoint(run_dir) "
            "finds the newest one)."
        )
    if not _is_complete(path):
        raise ValueError(
            f"checkpoint {path} is incomplete: the save that wrote it was interrupted (it is a temporary "
            f"directory or lacks {METADATA_FILE}). Load a complete one, e.g. latest_checkpoint(run_dir), "
            "and delete this directory."
        )
    with open(os.path.join(path, METADATA_FILE)) as f:
        return json.load(f)


def _check_compatible(path: str, saved: dict[str, list[int]], model: dict[str, list[int]], show: int = 3) -> None:
    """Raise naming the first differing tensors (and both shapes) unless names and global shapes match."""
    problems = _differences(saved, model)
    if problems:
        more = f"; and {len(problems) - show} more" if len(problems) > show else ""
        raise ValueError(
            f"checkpoint {path} does not fit this model ({'; '.join(problems[:show])}{more}). Nothing was "
            f"loaded. Build the model from the config it was saved with ({METADATA_FILE} has its shapes "
            "and extra)."
        )


def _differences(saved: dict[str, list[int]], model: dict[str, list[int]]) -> list[str]:
    """One line per tensor whose name or global shape differs, in the model's order."""
    problems = []
    for name, shape in model.items():
        if name not in saved:
            problems.append(f"{name}: model {shape}, not in the checkpoint")
        elif saved[name] != shape:
            problems.append(f"{name}: checkpoint {saved[name]} vs model {shape}")
    problems += [f"{name}: checkpoint {shape}, not in the model" for name, shape in saved.items() if name not in model]
    return problems


def _read_model_weights(path: str) -> dict[str, torch.Tensor]:
    """Every model tensor in full, read without a process group; keys without the ``model.`` prefix.

    Each name is read into a tensor of its own, so tied weights (saved under each name) share no
    storage and safetensors accepts them.
    """
    prefix = f"{_MODEL_KEY}."
    entries = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in entries.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    dcp.load(weights, checkpoint_id=path, no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in weights.items()}
