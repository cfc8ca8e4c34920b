"""How `torchmics prepare-data` scales with worker processes, on a machine with many cores.

    python benchmarks/prepare_data_scaling.py [--mib 256] [--out benchmarks/results/prepare-data]

Builds a JSONL corpus of about ``--mib`` MiB (at least one copy, ~31 MiB) of the Python standard library's
sources, trains
a byte-level BPE of 32,768 tokens on a sample of it (no download), then tokenizes the corpus with 1, 2,
4, ... workers up to the cores this process may use. Prints and writes a Markdown table (seconds, tokens/s,
speed-up over one worker, peak memory of the main process) and checks that every worker count writes the
same bytes. Needs ``pip install -e '.[data]'``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import sysconfig
import tempfile
from pathlib import Path

from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from torchmics.data.prepare import default_workers, prepare_data


def _corpus(path: Path, mib: int) -> list[str]:
    """Standard library sources, one JSON line each, repeated until ``mib`` MiB; returns one copy's texts."""
    texts = []
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" not in source.parts:
            try:
                texts.append(source.read_text())
            except (UnicodeDecodeError, OSError):
                continue
    with path.open("w") as f:
        while f.tell() < mib * 2**20:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return texts


def _tokenizer(path: Path, texts: list[str]) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32768, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts[:2000], trainer)
    tokenizer.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="corpus size in MiB")
    parser.add_argument("--out", default="benchmarks/results/prepare-data", help="folder for the Markdown table")
    args = parser.parse_args()
    cores = default_workers()
    counts = sorted({min(2**i, cores) for i in range(cores.bit_length() + 1)})
    quiet = Console(quiet=True)
    rows, digests = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = _corpus(root / "corpus.jsonl", args.mib)
        _tokenizer(root / "tokenizer.json", texts)
        for workers in counts:
            out = root / f"tokens-{workers}.bin"
            done = prepare_data(
                [str(root / "corpus.jsonl")], str(root / "tokenizer.json"), str(out), workers=workers, console=quiet
            )
            digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
            out.unlink()
            rows.append((workers, done.seconds, done.header.num_tokens / done.seconds, done.input_bytes))
            print(f"{workers:>3} workers: {done.seconds:7.1f} s, {rows[-1][2]:,.0f} tokens/s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    lines = [
        f"# prepare-data scaling: {platform.node()}, {cores} cores, {rows[0][3] / 2**20:.0f} MiB of JSONL, "
        f"BPE 32,768 tokens",
        "",
        "| workers | seconds | tokens/s | speed-up | MiB/s of input |",
        "|---|---|---|---|---|",
        *(f"| {w} | {s:.1f} | {r:,.0f} | {r / rows[0][2]:.2f}x | {b / s / 2**20:.1f} |" for w, s, r, b in rows),
        "",
        f"Identical output for every worker count: {len(digests) == 1}. Peak RSS of the main process: {peak:.0f} MiB.",
    ]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = Path(args.out) / f"{platform.node()}.md"
    table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {table}")


if __name__ == "__main__":
    main()
