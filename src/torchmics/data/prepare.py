"""Tokenize a corpus on every core into one token file, streaming and atomically.

The main process reads chunks of input (`sources.read_chunks`) and hands them to a pool of worker
processes, at most a few per worker in flight, so memory stays bounded whatever the corpus size;
results come back in input order, so the output is the same for any number of workers. Tokens are
appended to a `TokenFileWriter`, which only puts the file in place once it is complete.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from torchmics.data.sources import Chunk, expand_inputs, read_chunks, texts_of
from torchmics.data.tokenfile import TokenFileHeader, TokenFileWriter, dtype_for_vocab
from torchmics.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHUNKS_IN_FLIGHT_PER_WORKER = 4


@dataclass(frozen=True)
class Prepared:
    """What `prepare_data` wrote, and how long it took."""

    path: Path
    header: TokenFileHeader
    input_bytes: int
    empty_documents: int
    seconds: float


def default_workers() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_data(
    inputs: Iterable[str],
    tokenizer: str,
    out: str,
    text_field: str = "text",
    separator: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> Prepared:
    """Tokenize every document of ``inputs`` with ``tokenizer`` into the token file ``out``.

    Each document is followed by ``separator`` (default: the tokenizer's end-of-text token); empty
    documents are skipped. Every check on the inputs that needs no tokenizing runs before any work.
    """
    started = time.perf_counter()
    workers = workers or default_workers()
    files = expand_inputs(inputs)
    target = _check_output(Path(out), files, overwrite)
    local = load_tokenizer(tokenizer)
    separator, separator_id = local.separator(separator)
    dtype = dtype_for_vocab(local.vocab_size)
    console = console or Console(highlight=False, soft_wrap=True)
    total_bytes = sum(f.stat().st_size for f in files)
    documents = empty = 0
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with (
        # Built here, not in the initializer: Pool restarts a worker whose initializer fails, forever.
        context.Pool(workers, initializer=_start_worker, initargs=(local.build(), separator_id, dtype)) as pool,
        TokenFileWriter(target, dtype) as writer,
        _progress(console) as progress,
    ):
        task = progress.add_task("tokenizing", total=total_bytes, tokens=0)
        window = CHUNKS_IN_FLIGHT_PER_WORKER * workers
        for input_bytes, (tokens, docs, blanks) in _ordered_map(
            pool, _encode_chunk, read_chunks(files, text_field), window
        ):
            writer.write(tokens)
            documents, empty = documents + docs, empty + blanks
            progress.update(task, advance=input_bytes, tokens=writer.num_tokens)
        if writer.num_tokens == 0:
            raise ValueError(f"the inputs hold no text to tokenize ({len(files)} files, {empty} empty documents)")
        header = writer.commit(
            vocab_size=local.vocab_size,
            num_documents=documents,
            separator=separator,
            separator_id=separator_id,
            tokenizer=local.name,
            tokenizer_sha256=local.sha256,
        )
    return Prepared(target, header, total_bytes, empty, time.perf_counter() - started)


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the token file's path, e.g. {out / 'train.bin'}")
    if out.exists() and not overwrite:
        raise ValueError(
            f"--out {out} exists; pass --overwrite to replace it (atomically, when the new file is complete)"
        )
    if out.resolve() in {f.resolve() for f in inputs}:
        raise ValueError(f"--out {out} is also an input")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def _ordered_map(pool, fn: Callable, chunks: Iterator[Chunk], window: int) -> Iterator[tuple[int, object]]:
    """``(chunk.input_bytes, fn(chunk))`` in input order, with at most ``window`` chunks read ahead.

    `Pool.imap` would read the whole input ahead of the workers; this keeps memory bounded.
    """
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append((chunk.input_bytes, pool.apply_async(fn, (chunk,))))
        if len(pending) >= window:
            size, result = pending.popleft()
            yield size, result.get()
    while pending:
        size, result = pending.popleft()
        yield size, result.get()


_worker: dict = {}


def _start_worker(tokenizer: Tokenizer, separator_id: int, dtype: np.dtype) -> None:
    """Each worker keeps its tokenizer; its own thread pool stays off (the processes are the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=tokenizer, separator=np.array([separator_id], dtype=dtype), dtype=dtype)


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, int, int]:
    """The chunk's tokens, a separator after every document it ends; also (documents ended, empty ones)."""
    texts = texts_of(chunk)
    encodings = iter(_worker["tokenizer"].encode_batch([t for t in texts if t], add_special_tokens=False))
    pieces, documents = [], 0
    for i, text in enumerate(texts):
        if not text:
            continue
        pieces.append(np.asarray(next(encodings).ids, dtype=_worker["dtype"]))
        if not (chunk.continues and i == len(texts) - 1):
            pieces.append(_worker["separator"])
            documents += 1
    empty = sum(1 for t in texts if not t)
    return (np.concatenate(pieces) if pieces else np.empty(0, _worker["dtype"])), documents, empty
