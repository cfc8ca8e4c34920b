"""save_checkpoint: every rank writes its shards into a temporary folder, rank 0 publishes it once all are done.

The order is what makes a crash harmless: DCP's shards and each rank's own files first, then every
file's size and checksum, then ``torchmics.json`` (the mark of a complete checkpoint), then the rename
to the final name and the new ``latest``; only then are old checkpoints pruned.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter

from torchmics.checkpoint.every_rank import on_every_rank, on_rank0, ordinary_error
from torchmics.checkpoint.folders import (
    DCP_INDEX,
    HF_CONFIG_FILE,
    LATEST_FILE,
    METADATA_FILE,
    TEMP_MARK,
    prune,
    write_atomic,
)
from torchmics.checkpoint.integrity import FileRecords, record_files
from torchmics.checkpoint.rank_files import residual_file, rng_file, save_rank_files
from torchmics.checkpoint.state_dicts import MODEL_KEY, global_shapes, train_state
from torchmics.hf_config import HFConfig, model_config_text
from torchmics.sharding import topology_of
from torchmics.topology import Topology


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
    never overwritten. See :mod:`torchmics.checkpoint` for why a crash mid-save is harmless.

    ``keep``: once ``path`` is published, delete the oldest complete checkpoints of its run directory
    until ``keep`` remain (the new one is the newest), except those in ``protect`` (e.g. the one the
    run resumed from); ``None`` keeps every checkpoint.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint(step={step!r}): the step is the int number of optimizer steps done, >= 0")
    if keep is not None and keep < 1:
        raise ValueError(f"save_checkpoint(keep={keep}): keep at least 1 checkpoint, or None for all")
    topology = topology_of(model)
    extra = _check_json(extra or {})
    state = train_state(model, optimizer)  # first: a wrong optimizer is refused before any folder exists
    temp, config = on_rank0(lambda: _begin_save(path, model_config_text(model, hf_config, extra)))
    writer = _RecordingWriter(temp)
    unchanged = f"The previous checkpoint and `latest` are unchanged; {temp} can be deleted."
    with ordinary_error(f"saving checkpoint {path}", unchanged):
        dcp.save(state, storage_writer=writer)
    # Gathering every rank's records also means every rank's files are on disk before publishing.
    files = on_every_rank(lambda: save_rank_files(temp, model) or _record_own_files(temp, writer.written))
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
    own = [*written, *(os.path.relpath(f, temp) for f in (rng_file(temp), residual_file(temp)) if os.path.exists(f))]
    return record_files(temp, own + [DCP_INDEX] if dist.get_rank() == 0 else own)


def _merged(records: list[FileRecords]) -> FileRecords:
    return {name: record for part in records for name, record in sorted(part.items())}


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
    temp = f"{os.path.normpath(path)}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    os.makedirs(temp)
    return temp, config


def _metadata(step: int, extra: dict, topology: Topology, model_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "extra": extra,
        "world_size": topology.world_size,
        "partition_size": topology.partition_size,
        "gpus_per_node": topology.gpus_per_node,
        "torch_version": torch.__version__,
        "shapes": global_shapes(model_state),
    }


def _publish(temp: str, path: str, metadata: dict[str, Any], config: str | None, keep: int | None,
             protect: Sequence[str]) -> None:
    """Complete the temp dir, rename it to ``path``, repoint ``latest``, prune: each step leaves a valid run."""
    _refuse_existing(path)  # another job may have taken the name since _begin_save
    if config is not None:
        with open(os.path.join(temp, HF_CONFIG_FILE), "w") as f:
            f.write(config)
        metadata["files"] |= record_files(temp, [HF_CONFIG_FILE])
    write_atomic(os.path.join(temp, METADATA_FILE), json.dumps(metadata))
    os.rename(temp, path)
    run_dir, name = os.path.split(os.path.normpath(path))
    write_atomic(os.path.join(run_dir, LATEST_FILE), name)
    if keep is not None:
        prune(run_dir, keep, protect)
