"""What a checkpoint's files must be: sizes and CRC-32s recorded at save time, checked before loading.

Without them a truncated or deleted shard surfaces deep inside DCP as a bare ``EOFError`` or
``FileNotFoundError`` that names no file, after model and optimizer are partly loaded. With them the
damaged file is named, with what is wrong (missing, truncated, corrupt), before anything is read.

CRC-32 (zlib) detects accidental damage, not tampering; it runs at several GB/s, so reading back
what was just written (usually still in the page cache) costs little next to writing it. Each rank
checks its own share of the files (verify.py), so the cost does not grow with the world size.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable

_CHUNK = 16 * 2**20

FileRecords = dict[str, dict[str, int]]  # relative path -> {"size": bytes, "crc32": checksum}


class DamagedCheckpointError(ValueError):
    """A checkpoint's files differ from what its save recorded; ``problems`` has one line per bad file."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"checkpoint {path} is damaged: {'; '.join(problems)}")

    def __reduce__(self):  # noqa: ANN204 (pickled between ranks)
        return type(self), (self.path, self.problems)


def record_files(root: str, names: Iterable[str]) -> FileRecords:
    """Size and CRC-32 of each file ``root/name``, keyed by ``name`` (a path relative to ``root``)."""
    records = {}
    for name in names:
        path = os.path.join(root, name)
        records[name] = {"size": os.path.getsize(path), "crc32": _crc32(path)}
    return records


def find_damage(root: str, records: FileRecords, *, checksums: bool = True) -> list[str]:
    """One line per recorded file that is missing, of another size, or (``checksums``) of other content.

    ``checksums=False`` only looks at directory entries (one ``stat`` per file): cheap enough to scan
    every checkpoint of a run, and it catches deleted and truncated files.
    """
    problems = []
    for name, record in sorted(records.items()):
        path = os.path.join(root, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size < record["size"]:
            problems.append(f"{name} is truncated ({size} of {record['size']} bytes)")
        elif size > record["size"]:
            problems.append(f"{name} has grown ({size} bytes, {record['size']} were saved)")
        elif checksums and (crc := _crc32(path)) != record["crc32"]:
            problems.append(f"{name} is corrupt (CRC-32 {crc:08x}, {record['crc32']:08x} when saved)")
    return problems


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc
