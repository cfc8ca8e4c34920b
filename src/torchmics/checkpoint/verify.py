"""verify_checkpoint: every file a save recorded, checked before anything is read, its share by each rank.

integrity.py compares files with their records; this shares that work among the ranks of a job, gives
them one outcome, and remembers what this process verified already, so that choosing a checkpoint and
then loading it reads its files once.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from torchmics.checkpoint.every_rank import on_every_rank
from torchmics.checkpoint.folders import METADATA_FILE, read_metadata
from torchmics.checkpoint.integrity import DamagedCheckpointError, find_damage

_VERIFIED: set[tuple[str, int, int]] = set()  # checkpoints this process verified (see verify_checkpoint)


def verify_checkpoint(path: str) -> None:
    """Raise :class:`DamagedCheckpointError` naming each file that is missing, truncated or corrupt.

    Compares every file with the size and CRC-32 its save recorded (checkpoints saved without records
    pass unverified). In a job every rank calls it: each reads its share of the files, then all learn
    the outcome, so all raise together. Without a process group one process checks every file.
    :func:`~torchmics.checkpoint.load_checkpoint` calls it; a checkpoint this process verified already,
    unchanged since (same ``torchmics.json``), is not read twice.
    """
    records = read_metadata(path).get("files", {})
    identity = _identity(path)
    if identity in _VERIFIED:
        return
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        share = {name: records[name] for name in sorted(records)[rank::world]}
        problems = sorted(sum(on_every_rank(lambda: find_damage(path, share)), []))
    else:
        problems = find_damage(path, records)
    if problems:
        raise DamagedCheckpointError(path, problems)
    _VERIFIED.add(identity)


def _identity(path: str) -> tuple[str, int, int]:
    info = os.stat(os.path.join(path, METADATA_FILE))
    return os.path.realpath(path), info.st_ino, info.st_mtime_ns
