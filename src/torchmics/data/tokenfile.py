"""The token file `torchmics prepare-data` writes and `torchmics train --data` memory-maps.

Layout (all little-endian)::

    bytes 0-7      magic b"TMICSTOK"
    bytes 8-11     uint32 format version (1)
    bytes 12-15    uint32 length of the JSON header that follows
    bytes 16-...   the header, UTF-8 JSON (`TokenFileHeader`'s fields), zero-padded to byte 4096
    bytes 4096-... the tokens: uint16 when every id fits (vocabulary <= 65,536), else uint32

The data starts at a page boundary so that it maps directly. A file is written under a hidden
temporary name that starts with a different magic (``TMICSPRT``) and is renamed only once its header
holds the token count and checksum: a killed writer leaves either no file at the target path or a
partial one that every reader here refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

MAGIC = b"TMICSTOK"
PARTIAL_MAGIC = b"TMICSPRT"
VERSION = 1
HEADER_BYTES = 4096
_PREFIX = struct.Struct("<8sII")  # magic, version, JSON length
_HASH_BLOCK = 16 * 2**20


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id below ``vocab_size``."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass(frozen=True)
class TokenFileHeader:
    """What a token file says about itself.

    Documents are stored one after another, each followed by ``separator_id`` (the tokenizer's
    end-of-text token). ``tokenizer_sha256`` identifies the tokenizer (see `torchmics.data.tokenizer`)
    so that training can check that a model's own tokenizer is the one the data was made with;
    ``sha256`` is the checksum of the token bytes.
    """

    dtype: str
    vocab_size: int
    num_tokens: int
    num_documents: int
    separator: str
    separator_id: int
    tokenizer: str
    tokenizer_sha256: str
    sha256: str

    def to_bytes(self) -> bytes:
        body = json.dumps(dataclasses.asdict(self), indent=1).encode()
        if _PREFIX.size + len(body) > HEADER_BYTES:
            raise ValueError(
                f"token file header of {len(body)} bytes does not fit in {HEADER_BYTES} (tokenizer path too long?)"
            )
        return (_PREFIX.pack(MAGIC, VERSION, len(body)) + body).ljust(HEADER_BYTES, b"\0")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")


def read_header(path: str | os.PathLike) -> TokenFileHeader | None:
    """The header of the token file at ``path``, or None when the file is not one (no magic).

    A partial file, a newer format version, a damaged header and a size that disagrees with the
    token count are errors: each means the file must not be trained on as it is.
    """
    with open(path, "rb") as f:
        prefix = f.read(HEADER_BYTES)
    if prefix.startswith(PARTIAL_MAGIC):
        raise ValueError(
            f"{path} is an unfinished `torchmics prepare-data` output (that run was killed or failed before "
            "it completed); delete it and run prepare-data again"
        )
    if not prefix.startswith(MAGIC):
        return None
    if len(prefix) < HEADER_BYTES:
        raise ValueError(f"{path} is cut short: {len(prefix)} bytes, less than the {HEADER_BYTES}-byte header")
    _, version, length = _PREFIX.unpack_from(prefix)
    if version != VERSION:
        raise ValueError(f"{path} is token file format version {version}; this torchmics reads version {VERSION}")
    try:
        header = TokenFileHeader(**json.loads(prefix[_PREFIX.size : _PREFIX.size + length]))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: the token file header is damaged ({err})") from err
    expected = HEADER_BYTES + header.num_tokens * header.numpy_dtype.itemsize
    if os.path.getsize(path) != expected:
        raise ValueError(
            f"{path} has {os.path.getsize(path)} bytes but its header promises {header.num_tokens} {header.dtype} "
            f"tokens ({expected} bytes): the file is truncated or damaged (an interrupted copy?)"
        )
    return header


def map_tokens(path: str | os.PathLike, header: TokenFileHeader) -> np.ndarray:
    """The tokens as a read-only memory map (nothing is read until used)."""
    return np.memmap(path, dtype=header.numpy_dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))


def verify_checksum(path: str | os.PathLike, header: TokenFileHeader) -> None:
    """Hash the token bytes (about 1 GB/s) and compare with the header: catches bit rot and bad copies."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    if digest.hexdigest() != header.sha256:
        raise ValueError(
            f"{path}: the tokens' sha256 is {digest.hexdigest()} but the header records {header.sha256}: "
            "the file is damaged; prepare it again"
        )


class TokenFileWriter:
    """Stream token arrays into ``path`` atomically: a hidden ``.NAME.partial`` beside it, renamed by `commit`.

    Leaving the ``with`` block by an exception deletes the partial file; a killed process leaves it
    behind, marked partial, and the next run over the same path overwrites it.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype) -> None:
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.file = self.partial.open("wb")
        self.file.write(PARTIAL_MAGIC.ljust(HEADER_BYTES, b"\0"))
        self.digest = hashlib.sha256()
        self.num_tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self.digest.update(data)
        self.file.write(data)
        self.num_tokens += len(tokens)

    def commit(self, **fields: object) -> TokenFileHeader:
        """Write the header (``fields`` plus dtype, count and checksum), flush to disk, rename into place."""
        header = TokenFileHeader(
            dtype=self.dtype.name, num_tokens=self.num_tokens, sha256=self.digest.hexdigest(), **fields
        )
        self.file.seek(0)
        self.file.write(header.to_bytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:  # the rename itself must reach the disk too
            os.fsync(directory)
        finally:
            os.close(directory)
        return header

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        """Without a completed `commit` (an exception is on its way out), the partial file goes."""
        self.file.close()
        self.partial.unlink(missing_ok=True)  # after a commit it has been renamed: nothing to remove
