"""A run folder (``--out``) belongs to one job, and no run replaces another run's results in it.

Two jobs on one ``--out`` write one ``metrics.jsonl`` (the later one's records replace the earlier
one's) and collide at their first checkpoint. So the job holds ``torchmics.lock`` in the folder for
its whole life: created atomically (``O_CREAT | O_EXCL``, which NFS honours too), naming its holder
(pid, host, process start time, torchrun job id, command). A second job finds it and fails at once,
before spawning anything, naming the holder. A lock whose holder is gone is stale and taken over:

* its process is dead (same host: the pid is free, or now belongs to a process started later);
* or it belongs to an earlier attempt of this same torchrun job (same run id): torchrun stops every
  worker of an attempt before it starts the next, on whatever node rank 0 lands.

A holder on another host cannot be checked from here; the error says to delete the file if that
job is gone. Locally spawned ranks are covered by the launching process, which holds the lock;
under torchrun rank 0 holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from torchmics import checkpoint
from torchmics.tables import read_jsonl

LOCK_FILE = "torchmics.lock"
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_PREFIX = "superseded-"


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder; written into the lock file as JSON."""

    pid: int
    host: str
    process_start: int | None  # clock ticks after boot (Linux): tells a reused pid from the holder
    job: str | None  # the torchrun run id, shared by every restart of one torchrun job
    since: str
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), _process_start(os.getpid()), _torchrun_job(),
                   time.strftime("%Y-%m-%d %H:%M:%S"), shlex.join(["torchmics", *sys.argv[1:]]))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}: {self.command}"

    def is_gone(self, me: Holder) -> bool:
        """True when this holder certainly no longer runs (see the module docstring); False when unsure."""
        if self.job is not None and self.job == me.job:
            return True
        if self.host != me.host:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return self.process_start is not None and _process_start(self.pid) != self.process_start


class RunFolderBusy(ValueError):
    """Another job holds the run folder."""


def error_log(out: str, rank: int) -> Path:
    """Where a failing rank writes its full traceback (the command line shows one line of it)."""
    return Path(out) / f"error-rank{rank}.log"


def native_log(out: str, rank: int) -> Path:
    """Where a spawned rank's native libraries (c10d, gloo, NCCL) write, instead of the terminal."""
    return Path(out) / f"native-rank{rank}.log"


@contextlib.contextmanager
def hold(out: str) -> Iterator[bool]:
    """Hold ``out`` (created if needed) for this job, for the ``with`` block.

    Yields whether the lock was taken over from an earlier attempt of this same torchrun job, whose
    results in ``out`` are then this job's own to continue.

    Also proves ``out`` writable before anything else happens. Released on every way out of the
    ``with`` block; a process killed without cleanup leaves a lock that the next job finds stale.
    Folders it created and nothing filled are removed then: a job refused by its checks leaves no trace.
    """
    me = Holder.this_process()
    lock = Path(out) / LOCK_FILE
    if lock.parent.exists() and not lock.parent.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder (or not exist yet)")
    created = _missing_folders(lock.parent)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        replaced = _acquire(lock, me)
    except RunFolderBusy:
        raise
    except OSError as err:
        raise ValueError(f"--out {out} cannot be written ({err.strerror or err}); choose a folder you can write to") from err
    own_attempt = replaced is not None and replaced.job is not None and replaced.job == me.job
    if replaced is not None and not own_attempt:
        warnings.warn(f"--out {out} was locked by a job that is no longer running ({replaced.describe()}); "
                      "this job takes it over", stacklevel=3)
    try:
        yield own_attempt
    finally:
        _release(lock, me)
        _remove_if_empty(created)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; one holding anything stops it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _acquire(lock: Path, me: Holder) -> Holder | None:
    """Create the lock file for ``me``; take over a gone holder's. Returns the holder replaced, or None."""
    replaced = None
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder is None:  # being written by a job that won the race just now, or not ours to judge
                time.sleep(0.2)
                continue
            if not holder.is_gone(me):
                raise RunFolderBusy(
                    f"--out {lock.parent} is in use by another job ({holder.describe()}). Wait for it to finish or "
                    f"choose another --out; if that job is no longer running, delete {lock}"
                ) from None
            _remove_if_still(lock, holder)
            replaced = holder
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(me), f)
            f.flush()
            os.fsync(f.fileno())
        return replaced
    raise RunFolderBusy(f"cannot take the lock {lock}: it is unreadable or keeps changing; delete it if no job uses --out")


def _read_holder(lock: Path) -> Holder | None:
    try:
        return Holder(**json.loads(lock.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _remove_if_still(lock: Path, holder: Holder) -> None:
    """Remove the lock file if it still names ``holder``: another job may have taken it over meanwhile.

    Renaming first makes the check and the removal one step: if what was renamed turns out to be a
    newer lock, it is linked back (``link`` fails rather than replace a lock made in between).
    """
    moved = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, moved)
    except FileNotFoundError:
        return
    if _read_holder(moved) != holder:
        with contextlib.suppress(FileExistsError):
            os.link(moved, lock)
    moved.unlink()


def _release(lock: Path, me: Holder) -> None:
    if _read_holder(lock) == me:
        lock.unlink()


def _torchrun_job() -> str | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat), where there is /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def refuse_to_replace_results(out: str, resume_from: str | None) -> None:
    """A run appends to ``--out``'s metrics.jsonl only when it continues them, resuming from a checkpoint of ``--out``.

    Otherwise the file belongs to another run (or an earlier run into the same folder) and would be
    replaced: refuse, and say what to do instead.
    """
    records = read_jsonl(Path(out) / METRICS_FILE, missing_ok=True)
    if not records or (resume_from is not None and os.path.samefile(Path(resume_from).parent, out)):
        return
    steps = f"steps {records[0]['step']}-{records[-1]['step']}"
    if checkpoint.complete_checkpoints(out):
        instead = "pass --resume auto to continue that run, or choose another --out"
    else:
        instead = f"that run saved no checkpoint to continue from: choose another --out, or delete {out}/{METRICS_FILE}"
    raise ValueError(f"--out {out} holds another run's results ({METRICS_FILE}, {steps}) that this run would replace; {instead}")


def set_aside_newer(out: str, step: int) -> Path | None:
    """Move ``--out``'s checkpoint folders of steps after ``step`` (and a copy of metrics.jsonl) aside.

    A run resumed from ``step`` saves those steps again, and checkpoints are never overwritten; the
    branch it abandons is kept, not deleted, in ``superseded-<time>/``. Returns that folder, or None.
    """
    newer = sorted((s, path) for s, path in checkpoint.step_folders(out) if s > step)
    if not newer:
        return None
    aside = Path(out) / f"{SUPERSEDED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    aside.mkdir()
    metrics = Path(out) / METRICS_FILE
    if metrics.exists():
        shutil.copy2(metrics, aside / METRICS_FILE)
    for _, path in newer:
        os.rename(path, aside / os.path.basename(path))
    names = ", ".join(os.path.basename(path) for _, path in newer)
    warnings.warn(f"resuming from step {step}: moved the later checkpoints {names} and a copy of {METRICS_FILE} "
                  f"to {aside} (kept, not deleted)", stacklevel=2)
    return aside
