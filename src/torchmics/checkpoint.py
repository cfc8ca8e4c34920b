"""Checkpoints: sharded save/load through torch.distributed.checkpoint (DCP); full export is torchmics.export.

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
        residuals/rank<r>.pt  rank r's error-feedback residuals, under a quantized replica hop
        hf_config.json        the Hugging Face config of an HF model (torchmics.hf_config), for export
        torchmics.json        step, extra, topology, torch version, tensor shapes, and the size and
                              CRC-32 of every other file (checkpoint_integrity.py); written last
      step_200/
      step_300.tmp-1a2b3c4d/  an interrupted save: ignored by loading, removed by remove_interrupted_saves

A save writes into a temporary sibling directory and renames it to its final name only once every
rank has finished, then repoints ``latest``; a crash at any moment leaves the previous checkpoint and
``latest`` as they were. Loading first compares every file with its recorded size and checksum, so
a checkpoint damaged later (a full disk, a copy cut short, a deleted file) is named as such before
anything is read; checkpoints saved before sizes were recorded load unverified. The directory must
be on a file system every rank sees (for several nodes: a shared one, e.g. NFS or Lustre).
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from torchmics.checkpoint_integrity import DamagedCheckpointError, FileRecords, find_damage, record_files
from torchmics.hf_config import HFConfig, model_config_text
from torchmics.optim import ReplicaShardedOptimizer
from torchmics.sharding import shard_state, topology_of
from torchmics.topology import Topology, current_device

METADATA_FILE = "torchmics.json"
LATEST_FILE = "latest"
HF_CONFIG_FILE = "hf_config.json"
_DCP_INDEX = ".metadata"  # written by DCP on rank 0
_TEMP_MARK = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")
MODEL_KEY = "model"  # top-level key of the model state in the DCP checkpoint; tensors are "model.<fqn>"

_T = TypeVar("_T")
_VERIFIED: set[tuple[str, int, int]] = set()  # checkpoints this process verified (see verify_checkpoint)


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
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    extra: dict | None = None,
    keep: int | None = None,
    protect: Sequence[str] = (),
    hf_config: HFConfig | None = None,
) -> None:
    """Save model, optimizer, RNG states and ``extra`` to the new directory ``path``; every rank calls it.

    Each rank writes only the shards it owns (DCP), so saving costs no gather and no extra memory;
    each rank then records its own files' sizes and checksums. ``optimizer=None`` saves the weights
    only (load such a checkpoint without an optimizer). ``extra`` holds what resuming needs beyond
    tensors (data position, config) and must be JSON-serializable. ``hf_config`` (a ``config.json``,
    its folder or a ``transformers.PretrainedConfig``) is the Hugging Face config kept for
    :func:`torchmics.export_checkpoint`; by default the model's own, for a ``transformers`` model
    (:mod:`torchmics.hf_config` has the full rule). ``path`` must not exist: a complete checkpoint is
    never overwritten. See the module docstring for why a crash mid-save is harmless.

    ``keep``: once ``path`` is published, delete the oldest complete checkpoints of its run directory
    until ``keep`` remain (the new one is the newest), except those in ``protect`` (e.g. the one the
    run resumed from); ``None`` keeps every checkpoint.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"save_checkpoint(keep={keep}): keep at least 1 checkpoint, or None for all")
    topology = topology_of(model)
    extra = _check_json(extra or {})
    temp, config = on_rank0(lambda: _begin_save(path, model_config_text(model, hf_config, extra)))
    state = _train_state(model, optimizer)
    writer = _RecordingWriter(temp)
    unchanged = f"The previous checkpoint and `latest` are unchanged; {temp} can be deleted."
    with _ordinary_error(f"saving checkpoint {path}", unchanged):
        dcp.save(state, storage_writer=writer)
    # Gathering every rank's records also means every rank's files are on disk before publishing.
    files = _on_every_rank(lambda: _save_per_rank(temp, model) or _record_own_files(temp, writer.written))
    metadata = _metadata(step, extra, topology, state[MODEL_KEY]) | {"files": _merged(files)}
    on_rank0(lambda: _publish(temp, path, metadata, config, keep, protect))


class _RecordingWriter(FileSystemWriter):
    """DCP's file writer, remembering which files this rank wrote (their names are DCP's business)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.written: list[str] = []

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201 (DCP's signature)
        future = super().write_data(plan, planner)
        self.written = sorted({result.storage_data.relative_path for result in future.wait()})
        return future


def _record_own_files(temp: str, written: list[str]) -> FileRecords:
    """Sizes and checksums of this rank's shard files and RNG file (and DCP's index, on rank 0)."""
    own = [*written, *(os.path.relpath(f, temp) for f in (_rng_file(temp), _residual_file(temp)) if os.path.exists(f))]
    return record_files(temp, own + [_DCP_INDEX] if dist.get_rank() == 0 else own)


def _merged(records: list[FileRecords]) -> FileRecords:
    return {name: record for part in records for name, record in sorted(part.items())}


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
    _check_compatible(path, metadata["shapes"], _shapes(get_model_state_dict(model)))
    state = _train_state(model, optimizer)
    if optimizer is not None:
        _fit_optimizer_template(state["optim"], path)
    partly = "Model and optimizer may be partly loaded: build them afresh before loading another checkpoint."
    with _ordinary_error(f"loading checkpoint {path}", partly):
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
    _load_residuals(path, model)
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


def verify_checkpoint(path: str) -> None:
    """Raise :class:`DamagedCheckpointError` naming each file that is missing, truncated or corrupt.

    Compares every file with the size and CRC-32 its save recorded (checkpoints saved without records
    pass unverified). In a job every rank calls it: each reads its share of the files, then all learn
    the outcome, so all raise together. Without a process group one process checks every file.
    :func:`load_checkpoint` calls it; a checkpoint this process verified already, unchanged since
    (same ``torchmics.json``), is not read twice.
    """
    records = read_metadata(path).get("files", {})
    identity = _identity(path)
    if identity in _VERIFIED:
        return
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        share = {name: records[name] for name in sorted(records)[rank::world]}
        problems = sorted(sum(_on_every_rank(lambda: find_damage(path, share)), []))
    else:
        problems = find_damage(path, records)
    if problems:
        raise DamagedCheckpointError(path, problems)
    _VERIFIED.add(identity)


def _identity(path: str) -> tuple[str, int, int]:
    info = os.stat(os.path.join(path, METADATA_FILE))
    return os.path.realpath(path), info.st_ino, info.st_mtime_ns


def complete_checkpoints(run_dir: str) -> list[str]:
    """The complete checkpoints of ``run_dir``: the one ``latest`` names first, then by step, newest first.

    Interrupted saves are never listed; damaged ones are (see :func:`latest_checkpoint`).
    """
    if not os.path.isdir(run_dir):
        return []
    newest_first = [path for _, path in sorted(_complete_steps(run_dir), reverse=True)]
    pointer = os.path.join(run_dir, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = os.path.join(run_dir, f.read().strip())
        if named in newest_first:
            newest_first.remove(named)
            newest_first.insert(0, named)
    return newest_first


def step_folders(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``step_<N>`` folder in ``run_dir``, complete or not; interrupted saves excluded."""
    if not os.path.isdir(run_dir):
        return []
    return [
        (int(match.group(1)), os.path.join(run_dir, name))
        for name in os.listdir(run_dir)
        if (match := _STEP_DIR.fullmatch(name)) and os.path.isdir(os.path.join(run_dir, name))
    ]


def _complete_steps(run_dir: str) -> list[tuple[int, str]]:
    return [(step, path) for step, path in step_folders(run_dir) if _is_complete(path)]


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete, undamaged checkpoint in ``run_dir``, or ``None`` (no run dir, nothing saved).

    Reads the ``latest`` pointer; if it is missing or points at something incomplete, falls back to
    the complete ``step_<N>`` directory with the largest ``N``. Interrupted saves are never returned.
    A checkpoint with a recorded file missing or of the wrong size is skipped with a warning that names
    it; that check costs one ``stat`` per file, the checksums are compared when loading.
    """
    for path in complete_checkpoints(run_dir):
        problems = size_damage(path)
        if not problems:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {'; '.join(problems)}", stacklevel=2)
    return None


def size_damage(path: str) -> list[str]:
    """One line per recorded file of checkpoint ``path`` that is missing or of another size (one ``stat`` each)."""
    try:
        return find_damage(path, read_metadata(path).get("files", {}), checksums=False)
    except DamagedCheckpointError as err:
        return err.problems


def remove_interrupted_saves(run_dir: str) -> list[str]:
    """Delete what interrupted saves left in ``run_dir`` (``*.tmp-*``); returns their names.

    Only safe while no save into ``run_dir`` is under way: call it when the run starts, holding the run
    directory (`torchmics train` does, under its lock).
    """
    if not os.path.isdir(run_dir):
        return []
    names = sorted(name for name in os.listdir(run_dir) if _TEMP_MARK in name)
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


# ---- saving --------------------------------------------------------------------------------------


def on_rank0(fn: Callable[[], _T]) -> _T:
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


def _on_every_rank(fn: Callable[[], _T]) -> list[_T]:
    """Run ``fn`` on every rank and hand every rank all results by rank, or the first rank's error everywhere.

    The gather is also a barrier; a rank that fails still joins it, so no rank is left waiting.
    """
    try:
        mine: tuple[bool, Any] = (True, fn())
    except Exception as err:  # re-raised below, on every rank
        mine = (False, err)
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


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


def _begin_save(path: str, config: str | None) -> tuple[str, str | None]:
    """Refuse an existing ``path`` before writing anything (the HF config was read already); make the temp dir."""
    _refuse_existing(path)
    temp = f"{os.path.normpath(path)}{_TEMP_MARK}{uuid.uuid4().hex[:8]}"
    os.makedirs(temp)
    return temp, config


def _train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Sharded (DTensor) state dicts of model and optimizer, keyed by the unwrapped model's names."""
    if isinstance(optimizer, ReplicaShardedOptimizer):
        optim_state = optimizer.sharded_state_dict()  # first: it synchronizes the master weights
        return {MODEL_KEY: get_model_state_dict(model), "optim": optim_state}
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    return {MODEL_KEY: model_state, "optim": optim_state}


def _restore_train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    if isinstance(optimizer, ReplicaShardedOptimizer):
        set_model_state_dict(model, state[MODEL_KEY])
        optimizer.load_sharded_state_dict(state["optim"])
        return
    optimizers = [optimizer] if optimizer is not None else []
    # Not strict: parameters without saved optimizer state stay stateless (_fit_optimizer_template);
    # the model's names and shapes were checked against the checkpoint before loading.
    set_state_dict(model, optimizers, model_state_dict=state[MODEL_KEY], optim_state_dict=state["optim"],
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


def _publish(temp: str, path: str, metadata: dict[str, Any], config: str | None, keep: int | None,
             protect: Sequence[str]) -> None:
    """Complete the temp dir, rename it to ``path``, repoint ``latest``, prune: each step leaves a valid run."""
    _refuse_existing(path)  # another job may have taken the name since _begin_save
    if config is not None:
        with open(os.path.join(temp, HF_CONFIG_FILE), "w") as f:
            f.write(config)
        metadata["files"] |= record_files(temp, [HF_CONFIG_FILE])
    _write_atomic(os.path.join(temp, METADATA_FILE), json.dumps(metadata))
    os.rename(temp, path)
    run_dir, name = os.path.split(os.path.normpath(path))
    _write_atomic(os.path.join(run_dir, LATEST_FILE), name)
    if keep is not None:
        _prune(run_dir, keep, protect)


def _prune(run_dir: str, keep: int, protect: Sequence[str]) -> None:
    """Delete the complete checkpoints older than the newest ``keep``, except ``protect``.

    Each is renamed to a temporary name before its files go, so a crash mid-delete leaves an
    interrupted save (never loaded, removed at the next start), not a checkpoint missing files.
    """
    protected = {os.path.realpath(p) for p in protect}
    for _, old in sorted(_complete_steps(run_dir), reverse=True)[keep:]:
        if os.path.realpath(old) not in protected:
            doomed = f"{old}{_TEMP_MARK}deleting-{uuid.uuid4().hex[:8]}"
            os.rename(old, doomed)
            shutil.rmtree(doomed)


def _write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    temp = f"{path}{_TEMP_MARK}{uuid.uuid4().hex[:8]}"
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


# ---- per-rank state: RNG, error-feedback residuals --------------------------------------------------


def _save_per_rank(checkpoint: str, model: nn.Module) -> None:
    _save_rng(checkpoint)
    hop = shard_state(model).quantized_hop
    if hop is not None and hop.format.error_feedback:
        os.makedirs(os.path.dirname(_residual_file(checkpoint)), exist_ok=True)
        torch.save({"layout": _residual_layout(model), **hop.state_dict()}, _residual_file(checkpoint))


def _residual_layout(model: nn.Module) -> list:
    """What decides which elements a rank's residuals stand for: world, partition size and the blocks."""
    topology, fmt = topology_of(model), shard_state(model).quantized_hop.format
    return [topology.world_size, topology.partition_size, str(fmt.dtype), fmt.block_size]


def _residual_file(checkpoint: str) -> str:
    return os.path.join(checkpoint, "residuals", f"rank{dist.get_rank()}.pt")


def _load_residuals(checkpoint: str, model: nn.Module) -> None:
    """Restore this rank's residuals where they mean the same thing: same topology and format.

    A residual is what one rank's contributions to its replicas' chunks still owe; on another world
    size, partition size or block size the chunks are other ones, so the residuals start from zero,
    which drops at most one step's rounding (the error a run without feedback makes every step).
    """
    hop = shard_state(model).quantized_hop
    if hop is None or not hop.format.error_feedback or not os.path.exists(_residual_file(checkpoint)):
        return
    saved = torch.load(_residual_file(checkpoint), weights_only=True)
    if saved["layout"] == _residual_layout(model):
        hop.load_state_dict(saved, current_device())
    elif dist.get_rank() == 0:
        warnings.warn(f"{checkpoint} holds error-feedback residuals of another topology or replica-hop format: "
                      "they start from zero (at most one step's quantization error is dropped).", stacklevel=3)


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


def read_metadata(path: str) -> dict[str, Any]:
    """The checkpoint's ``torchmics.json``; a clear error for a missing, interrupted or damaged checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}: expected a step_<N> folder holding {METADATA_FILE}")
    if not _is_complete(path):
        raise ValueError(
            f"checkpoint {path} is incomplete: the save that wrote it was interrupted (it is a temporary "
            f"folder or lacks {METADATA_FILE}). Use a complete checkpoint of the run and delete this folder."
        )
    try:
        with open(os.path.join(path, METADATA_FILE)) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DamagedCheckpointError(path, [f"{METADATA_FILE} is not valid JSON ({err})"]) from err


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
