"""`torchmics prepare-data`: text, JSONL or Parquet files through a local tokenizer into a token file."""

from __future__ import annotations

import argparse

from torchmics.data.prepare import default_workers, prepare_data
from torchmics.data.tokenfile import HEADER_BYTES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="tokenize text / JSONL / Parquet files into a token file for `train --data`",
        description="Tokenize INPUT files (folders are read recursively, in sorted order) with a local Hugging Face "
        "tokenizer, on every core, into one token file: a header (dtype, vocabulary, tokenizer hash, separator, "
        "checksum) and the tokens, uint16 or uint32 by vocabulary size. *.jsonl: one JSON object per line; "
        "*.parquet: one row per document; anything else: a UTF-8 text file per document. The file appears "
        "only when complete.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument(
        "--tokenizer", required=True, help="a tokenizer.json, or a folder holding one (or a transformers tokenizer)"
    )
    parser.add_argument("--out", required=True, help="the token file to write, e.g. data/train.bin")
    parser.add_argument(
        "--text-field", default="text", help="JSONL field / Parquet column holding the text (default: text)"
    )
    parser.add_argument(
        "--separator", help="token written after every document (default: the tokenizer's eos, e.g. <|endoftext|>)"
    )
    parser.add_argument(
        "--workers", type=int, help=f"tokenizing processes (default: the cores, {default_workers()} here)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    done = prepare_data(
        args.inputs, args.tokenizer, args.out, args.text_field, args.separator, args.workers, args.overwrite
    )
    header = done.header
    size = HEADER_BYTES + header.num_tokens * header.numpy_dtype.itemsize
    print(
        f"wrote {done.path} ({size / 2**20:.1f} MiB): {header.num_tokens:,} {header.dtype} tokens of "
        f"{header.num_documents:,} documents ({done.empty_documents:,} empty skipped), each followed by "
        f"{header.separator!r} (id {header.separator_id})\n"
        f"from {done.input_bytes / 2**20:.1f} MiB of input in {done.seconds:.1f} s "
        f"({header.num_tokens / done.seconds:,.0f} tokens/s); tokenizer {header.tokenizer} "
        f"(vocabulary {header.vocab_size:,}, sha256 {header.tokenizer_sha256[:16]}...)"
    )
