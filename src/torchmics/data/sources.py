"""Documents out of input files, streamed in chunks of about a megabyte (never a whole corpus in memory).

A ``.jsonl`` file holds one document per line (a JSON object; its text is one field), a ``.parquet``
file one per row (its text is one column, read by pyarrow a row batch at a time), and any other file
is one document of UTF-8 text. A text file larger than a chunk is cut at line ends into pieces that
are tokenized separately and stored back to back, with no separator between them.

The main process only reads bytes; JSON lines are parsed in the worker processes (`texts_of`), so
parsing scales with the cores too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 2**20
PARQUET_BATCH_ROWS = 512


@dataclass(frozen=True)
class Chunk:
    """One worker task. ``texts`` are documents, or raw JSONL lines when ``json_field`` is set.

    ``continues``: the last text is a piece of a document that goes on in the next chunk.
    ``input_bytes`` is how much of the input this chunk covers, for the progress bar.
    """

    texts: list[str | bytes | None]
    input_bytes: int
    json_field: str | None = None
    origin: str = ""
    first_line: int = 1
    continues: bool = False


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files and folders (read recursively in sorted order, hidden entries skipped) as a list of files."""
    files: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = (f for f in sorted(given.rglob("*")) if f.is_file())
            files += [f for f in found if not any(part.startswith(".") for part in f.relative_to(given).parts)]
        elif given.is_file():
            files.append(given)
        else:
            raise ValueError(f"input {given} does not exist")
    seen: set[Path] = set()
    for f in files:
        if f.resolve() in seen:
            raise ValueError(f"input {f} is given twice (a file and a folder holding it, say); list each file once")
        seen.add(f.resolve())
        if f.suffix == ".json":
            raise ValueError(
                f"{f}: a .json file is read neither as JSON Lines (name it .jsonl) nor as text (name it .txt)"
            )
    if not files:
        raise ValueError(f"no input files in {', '.join(map(str, inputs))}")
    return files


def read_chunks(files: list[Path], text_field: str) -> Iterator[Chunk]:
    """Every input file's documents, in order, as chunks; consecutive small text files share one."""
    pending: list[str] = []
    pending_bytes = 0
    for path in files:
        if path.suffix in (".jsonl", ".parquet") and pending:
            yield Chunk(pending, pending_bytes)
            pending, pending_bytes = [], 0
        if path.suffix == ".jsonl":
            yield from _jsonl_chunks(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_chunks(path, text_field)
        else:
            for piece, size, last in _text_pieces(path):
                pending.append(piece)
                pending_bytes += size
                if pending_bytes >= CHUNK_BYTES or not last:
                    yield Chunk(pending, pending_bytes, continues=not last)
                    pending, pending_bytes = [], 0
    if pending:
        yield Chunk(pending, pending_bytes)


def texts_of(chunk: Chunk) -> list[str | None]:
    """The chunk's document texts (None for a blank line or a null field); JSON is parsed here."""
    if chunk.json_field is None:
        return chunk.texts
    return [
        _json_text(line, chunk.json_field, chunk.origin, chunk.first_line + i) for i, line in enumerate(chunk.texts)
    ]


def _json_text(line: bytes, field: str, origin: str, number: int) -> str | None:
    import json

    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{origin}, line {number}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
        raise ValueError(f"{origin}, line {number}: no field {field!r} (it has: {fields}); pass --text-field NAME")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{origin}, line {number}: field {field!r} is a {type(text).__name__}, not a string")
    return text


def _jsonl_chunks(path: Path, field: str) -> Iterator[Chunk]:
    lines: list[bytes] = []
    size, first = 0, 1
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            lines.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                yield Chunk(lines, size, field, str(path), first)
                lines, size, first = [], 0, number + 1
    if lines:
        yield Chunk(lines, size, field, str(path), first)


def _parquet_chunks(path: Path, column: str) -> Iterator[Chunk]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'torchmics[data]'") from err
    table = pq.ParquetFile(path)
    schema = table.schema_arrow
    if column not in schema.names:
        raise ValueError(f"{path} has no column {column!r} (it has: {', '.join(schema.names)}); pass --text-field NAME")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {column!r} holds {kind}, not strings")
    rows, size = max(1, table.metadata.num_rows), os.path.getsize(path)
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        yield Chunk(batch.column(0).to_pylist(), size * batch.num_rows // rows)


def _text_pieces(path: Path) -> Iterator[tuple[str, int, bool]]:
    """``(text, its size in bytes, is the file's last piece)``; pieces end at a line end where there is one."""
    offset = 0
    with path.open("rb") as f:
        pending = f.read(CHUNK_BYTES)
        while more := f.read(CHUNK_BYTES):
            cut = pending.rfind(b"\n") + 1 or _char_boundary(pending)
            yield _decode(path, pending[:cut], offset), cut, False
            pending, offset = pending[cut:] + more, offset + cut
        yield _decode(path, pending, offset), len(pending), True


def _char_boundary(data: bytes) -> int:
    """Where the last character of ``data`` starts (continuation bytes are 0b10xxxxxx): no UTF-8 sequence is cut."""
    cut = len(data) - 1
    while cut > 0 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut or len(data)


def _decode(path: Path, data: bytes, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {offset + err.start}: {err.reason}); only UTF-8 is read"
        ) from err
