"""Token data for training: where tokens come from, and which of them each rank reads at each step.

Every batch is a pure function of ``(seed, step, micro_step)``, so all ranks agree on the global batch
without talking to each other, and the data position is just the step number: a run resumed at step
``s`` reads exactly the batches the uninterrupted run would have read, which is why a checkpoint only
needs to store the step.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torchmics.data.tokenfile import TokenFileHeader, map_tokens, read_header, verify_checksum
from torchmics.data.tokenizer import model_tokenizer

STDLIB_CORPUS_BYTES = 8 * 2**20
VAL_FRACTION = 0.05


@dataclass(frozen=True)
class TokenData:
    """Train and validation tokens (1-D arrays, possibly memory-mapped) and the vocabulary they need.

    ``vocab_size`` is 256 for bytes, the tokenizer's for a `torchmics prepare-data` file (``header``),
    and ``max token + 1`` for a headerless ``.bin``: the smallest vocabulary the data fits. A model may
    have a larger one (GPT-2's tokenizer padded to 50304, say): use the model's.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str
    header: TokenFileHeader | None = None


def load_tokens(path: str | None, seq_len: int | None = None, verify: bool = False) -> TokenData:
    """Load tokens from ``path``; the last 5% (in file order) are held out for validation.

    ``path`` is ``None`` for the embedded corpus (the Python standard library's own ``.py`` files,
    as bytes), a token file of `torchmics prepare-data` (any name; uint16 or uint32, memory-mapped),
    a headerless ``.bin`` file of uint16 tokens (nanoGPT's format, memory-mapped), or a text file or
    a folder of text files read as bytes (vocab 256). Folders are read recursively in sorted path
    order, skipping hidden files, so the same folder always gives the same tokens. With ``seq_len``
    the validation split holds at least one sequence, and too little data is an error here, not
    mid-run. ``verify`` checks a token file's checksum too (reads the whole file once).
    """
    header = None
    if path is None:
        tokens, source = _stdlib_corpus()
    elif not os.path.exists(path):
        raise ValueError(f"data path {path} does not exist")
    elif os.path.isfile(path) and (header := read_header(path)) is not None:
        tokens, source = _prepared_tokens(path, header, verify)
    elif path.endswith(".bin"):
        tokens, source = _uint16_tokens(path)
    else:
        tokens, source = _text_bytes(Path(path))
    n_val = max(math.ceil(VAL_FRACTION * len(tokens)), 1 if seq_len is None else seq_len + 1)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    _check_enough(train, seq_len or 0, f"{source} ({len(tokens)} tokens, {n_val} held out for validation), train split")
    if header is not None:
        vocab_size = header.vocab_size
    else:
        vocab_size = 256 if tokens.dtype == np.uint8 else int(tokens.max()) + 1
    return TokenData(train=train, val=val, vocab_size=vocab_size, source=source, header=header)


def check_model_fits(data: TokenData, model: str, model_vocab_size: int) -> None:
    """Every token id needs an embedding row, and a ``hf:`` model folder's own tokenizer must be the data's.

    A smaller vocabulary would fail mid-run with an index error (or, on GPUs, a device assert); a
    different tokenizer would train without any error on numbers that mean other words.
    """
    made_with = f" (tokenizer {data.header.tokenizer})" if data.header is not None else ""
    if data.vocab_size > model_vocab_size:
        raise ValueError(
            f"the data needs a vocabulary of {data.vocab_size} tokens{made_with} but model {model} has "
            f"{model_vocab_size}: choose a model whose vocabulary covers the data's"
        )
    shipped = model_tokenizer(model) if data.header is not None else None
    if shipped is not None and shipped.sha256 != data.header.tokenizer_sha256:
        raise ValueError(
            f"the data was tokenized with {data.header.tokenizer} (sha256 {data.header.tokenizer_sha256[:12]}...) "
            f"but model {model} ships another tokenizer, {shipped.name} (sha256 {shipped.sha256[:12]}...): "
            f"prepare the data with `torchmics prepare-data ... --tokenizer {shipped.name}`"
        )


def _stdlib_corpus() -> tuple[np.ndarray, str]:
    """The first 8 MB of the standard library's sources: real code, present wherever Python is, no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in ("site-packages", "dist-packages")]  # installed packages
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    files.sort()
    chunks, size = [], 0
    for f in files:
        if size >= STDLIB_CORPUS_BYTES:
            break
        chunks.append(f.read_bytes()[: STDLIB_CORPUS_BYTES - size])
        size += len(chunks[-1])
    source = f"python stdlib sources ({root}, {len(chunks)} files, {size / 2**20:.1f} MB, bytes)"
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), source


def _text_bytes(path: Path) -> tuple[np.ndarray, str]:
    if path.is_file():
        return np.frombuffer(path.read_bytes(), dtype=np.uint8), f"text file {path} (bytes)"
    files = [f for f in sorted(path.rglob("*")) if f.is_file()]
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(path).parts)]
    data = b"".join(f.read_bytes() for f in files)
    return np.frombuffer(data, dtype=np.uint8), f"text folder {path} ({len(files)} files, bytes)"


def _prepared_tokens(path: str, header: TokenFileHeader, verify: bool) -> tuple[np.ndarray, str]:
    if verify:
        verify_checksum(path, header)
    source = (
        f"token file {path} ({header.num_tokens:,} {header.dtype} tokens, {header.num_documents:,} documents, "
        f"tokenizer {header.tokenizer})"
    )
    return map_tokens(path, header), source


def _uint16_tokens(path: str) -> tuple[np.ndarray, str]:
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f"{path} has {size} bytes, an odd number: not a file of uint16 tokens")
    if size == 0:
        raise ValueError(f"{path} is empty: 0 tokens")
    return np.memmap(path, dtype=np.uint16, mode="r"), f"uint16 tokens {path}"


def _check_enough(tokens: np.ndarray, seq_len: int, what: str) -> None:
    """One training example is ``seq_len + 1`` consecutive tokens (inputs plus the shifted targets)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{what}: {len(tokens)} tokens, need at least {seq_len + 1} for one sequence of {seq_len}")


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; each rank reads its rows of the global micro-batch.

    ``global_batch_size`` is the number of sequences in one micro-step summed over all ranks. Rank
    ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)``, so concatenating every rank's batch in rank
    order gives ``global_batch`` and a sharded run sees exactly the data of a single-process run.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        _check_enough(tokens, seq_len, "batch sampler")
        if global_batch_size < 1 or global_batch_size % world_size != 0:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by world size {world_size}: "
                f"every rank must get the same number of rows"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.tokens, self.seq_len, self.global_batch_size, self.seed = tokens, seq_len, global_batch_size, seed
        local = global_batch_size // world_size
        self.rows = slice(rank * local, (rank + 1) * local)

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)``, each ``[global_batch_size / world_size, seq_len]`` int64; y is x shifted by one."""
        return self._windows(step, micro_step, self.rows)

    def global_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's rows together: the batch a single-process reference run trains on."""
        return self._windows(step, micro_step, slice(None))

    def _windows(self, step: int, micro_step: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0 or micro_step < 0:
            raise ValueError(f"step and micro_step must be >= 0, got {step}, {micro_step}")
        rng = np.random.default_rng([self.seed, step, micro_step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)[rows]
        windows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]
