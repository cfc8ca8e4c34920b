"""The run directory: its file names, which checkpoints are complete, and changes that leave it valid.

Only folder names and small files are read here, never tensors: this is what a command reads to choose
a checkpoint, and what saving uses to publish one so that a crash at any moment leaves a valid run
directory (the layout is pictured in :mod:`torchmics.checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

from torchmics.checkpoint.integrity import DamagedCheckpointError, find_damage

METADATA_FILE = "torchmics.json"
LATEST_FILE = "latest"
HF_CONFIG_FILE = "hf_config.json"
DCP_INDEX = ".metadata"  # written by DCP on rank 0
TEMP_MARK = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_path(run_dir: str, step: int) -> str:
    """Where the checkpoint of ``step`` lives in ``run_dir``: the name :func:`latest_checkpoint` scans for."""
    return os.path.join(run_dir, f"step_{step}")


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


def _is_complete(path: str) -> bool:
    """A finished save: not a temp dir, and it has the metadata file that is written last."""
    name = os.path.basename(os.path.normpath(path))
    return TEMP_MARK not in name and os.path.isfile(os.path.join(path, METADATA_FILE))


def read_metadata(path: str) -> dict[str, Any]:
    """The checkpoint's ``torchmics.json``; a clear error for a missing, interrupted or damaged checkpoint,
    or a folder that is no checkpoint (a run folder is named as one, with its newest checkpoint)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}: expected a step_<N> folder holding {METADATA_FILE}")
    if TEMP_MARK in os.path.basename(os.path.normpath(path)):
        raise ValueError(f"{path} is an interrupted save, not a checkpoint: use a complete checkpoint of the run "
                         "(remove_interrupted_saves, and every `torchmics train` of the run, clean these up)")
    if not _is_complete(path):
        inside = complete_checkpoints(path)
        if inside:
            raise ValueError(f"{path} is a run folder, not a checkpoint: pass one of its checkpoints, "
                             f"e.g. the newest, {inside[0]}")
        raise ValueError(f"{path} is not a complete checkpoint (no {METADATA_FILE} in it: an interrupted save, "
                         "or another kind of folder); pass a step_<N> folder of a run")
    try:
        with open(os.path.join(path, METADATA_FILE)) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DamagedCheckpointError(path, [f"{METADATA_FILE} is not valid JSON ({err})"]) from err


def remove_interrupted_saves(run_dir: str) -> list[str]:
    """Delete what interrupted saves left in ``run_dir`` (``*.tmp-*``); returns their names.

    Only safe while no save into ``run_dir`` is under way: call it when the run starts, holding the run
    directory (`torchmics train` does, under its lock).
    """
    if not os.path.isdir(run_dir):
        return []
    names = sorted(name for name in os.listdir(run_dir) if TEMP_MARK in name)
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


def prune(run_dir: str, keep: int, protect: Sequence[str]) -> None:
    """Delete the complete checkpoints older than the newest ``keep``, except ``protect``.

    Each is renamed to a temporary name before its files go, so a crash mid-delete leaves an
    interrupted save (never loaded, removed at the next start), not a checkpoint missing files.
    """
    protected = {os.path.realpath(p) for p in protect}
    for _, old in sorted(_complete_steps(run_dir), reverse=True)[keep:]:
        if os.path.realpath(old) not in protected:
            doomed = f"{old}{TEMP_MARK}deleting-{uuid.uuid4().hex[:8]}"
            os.rename(old, doomed)
            shutil.rmtree(doomed)


def write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    temp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
