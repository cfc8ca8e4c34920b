"""`torchmics prepare-data`: documents in, a token file out; every check reads the file's bytes itself."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_tokenizers import DOCUMENTS, EOT, byte_bpe, large_word_level, save
from tokenizers import Tokenizer

from torchmics.cli import main
from torchmics.data import sources
from torchmics.train.data import load_tokens

HEADER = 4096


def _read(path: Path) -> tuple[dict, bytes]:
    """The header (JSON) and the token bytes of a token file, by the layout documented in tokenfile.py."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<8sII", data)
    assert (magic, version) == (b"TMICSTOK", 1)
    assert data[16 + length : HEADER] == b"\0" * (HEADER - 16 - length)
    return json.loads(data[16 : 16 + length]), data[HEADER:]


def _documents(path: Path, tokenizer: Tokenizer) -> list[str]:
    """Decode each document: the tokens between separators."""
    header, body = _read(path)
    tokens = np.frombuffer(body, dtype="<" + {"uint16": "u2", "uint32": "u4"}[header["dtype"]])
    assert tokens[-1] == header["separator_id"]
    ends = np.flatnonzero(tokens == header["separator_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]


def _prepare(*args: str | Path) -> None:
    assert main(["prepare-data", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[Tokenizer, Path]:
    tokenizer = byte_bpe(400)
    return tokenizer, save(tokenizer, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _corpus(folder: Path) -> list[Path]:
    """The same documents as two text files, a JSONL file (field "body") and a Parquet file (column "body")."""
    folder.mkdir()
    (folder / "a.txt").write_text(DOCUMENTS[0])
    (folder / "b.txt").write_text(DOCUMENTS[1])
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(DOCUMENTS)]
    (folder / "c.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line
    pq.write_table(pa.table({"body": DOCUMENTS + [None], "n": list(range(len(DOCUMENTS) + 1))}), folder / "d.parquet")
    return [folder / "a.txt", folder / "b.txt", folder / "c.jsonl", folder / "d.parquet"]


def test_every_format_round_trips_document_by_document(bpe, tmp_path, capsys):
    tokenizer, tokenizer_path = bpe
    inputs = _corpus(tmp_path / "corpus")
    out = tmp_path / "out" / "train.bin"
    _prepare(*inputs, "--tokenizer", tokenizer_path, "--out", out, "--text-field", "body", "--workers", "2")
    expected = DOCUMENTS[:2] + DOCUMENTS + DOCUMENTS
    assert _documents(out, tokenizer) == expected
    header, body = _read(out)
    assert header["dtype"] == "uint16" and header["vocab_size"] == tokenizer.get_vocab_size() == 400
    assert header["num_tokens"] == len(body) // 2 and header["num_documents"] == len(expected)
    assert header["sha256"] == hashlib.sha256(body).hexdigest()
    assert (header["separator"], header["separator_id"]) == (EOT, tokenizer.token_to_id(EOT))
    assert header["tokenizer"] == str(tokenizer_path.resolve())
    assert re.fullmatch("[0-9a-f]{64}", header["tokenizer_sha256"])  # what it identifies: tests/test_data.py
    printed = capsys.readouterr().out
    assert f"{header['num_tokens']:,} uint16 tokens of {len(expected)} documents (2 empty skipped)" in printed


def test_output_is_independent_of_workers_and_chunking(bpe, tmp_path, monkeypatch):
    """Small chunks cut the long text file into pieces; results still come back in input order."""
    tokenizer, tokenizer_path = bpe
    inputs = _corpus(tmp_path / "corpus")
    _prepare(
        *inputs, "--tokenizer", tokenizer_path, "--out", tmp_path / "one.bin", "--text-field", "body", "--workers", "1"
    )
    _prepare(
        *inputs, "--tokenizer", tokenizer_path, "--out", tmp_path / "two.bin", "--text-field", "body", "--workers", "2"
    )
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    long_text = tmp_path / "long.txt"
    long_text.write_text("".join(DOCUMENTS) * 3)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)
    small = tmp_path / "small-chunks.bin"
    _prepare(
        *inputs, long_text, "--tokenizer", tokenizer_path, "--out", small, "--text-field", "body", "--workers", "2"
    )
    assert _documents(small, tokenizer) == DOCUMENTS[:2] + DOCUMENTS + DOCUMENTS + ["".join(DOCUMENTS) * 3]


def test_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    tokenizer = large_word_level(70_000)
    tokenizer_path = save(tokenizer, tmp_path / "words" / "tokenizer.json")
    docs = ["w69998 w3 w65536", "w65535 w0 w12345 w69000"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "words.bin"
    _prepare(tmp_path / "docs.jsonl", "--tokenizer", tokenizer_path, "--out", out)
    header, body = _read(out)
    assert (header["dtype"], header["vocab_size"], header["separator_id"]) == ("uint32", 70_000, 69_999)
    np.testing.assert_array_equal(np.frombuffer(body, "<u4"), [69998, 3, 65536, 69999, 65535, 0, 12345, 69000, 69999])
    assert _documents(out, tokenizer) == docs
    data = load_tokens(str(out))
    assert data.vocab_size == 70_000 and data.train.dtype == np.dtype("<u4") and data.header.num_documents == 2


def test_truncation_in_the_tokenizer_file_does_not_cut_documents(tmp_path):
    tokenizer = byte_bpe(300)
    tokenizer.enable_truncation(max_length=4)
    tokenizer_path = save(tokenizer, tmp_path / "truncating.json")
    (tmp_path / "doc.txt").write_text(DOCUMENTS[1])
    _prepare(tmp_path / "doc.txt", "--tokenizer", tokenizer_path, "--out", tmp_path / "t.bin")
    assert _documents(tmp_path / "t.bin", byte_bpe(300)) == [DOCUMENTS[1]]


def test_separator_comes_from_the_tokenizer_config_or_the_flag(tmp_path):
    folder = tmp_path / "model"
    tokenizer = byte_bpe(300, DOCUMENTS + ["<|im_end|>"])
    tokenizer.add_special_tokens(["<|im_end|>", "<|eot|>"])
    save(tokenizer, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "doc.txt").write_text("hello")
    _prepare(tmp_path / "doc.txt", "--tokenizer", folder, "--out", tmp_path / "a.bin")
    assert _read(tmp_path / "a.bin")[0]["separator"] == "<|im_end|>"
    _prepare(tmp_path / "doc.txt", "--tokenizer", folder, "--out", tmp_path / "b.bin", "--separator", "<|eot|>")
    assert _read(tmp_path / "b.bin")[0]["separator_id"] == tokenizer.token_to_id("<|eot|>")


def test_a_killed_run_leaves_no_file_that_train_accepts(bpe, tmp_path):
    """The process SIGKILLs itself in the middle of writing: nothing at --out, and the partial file is refused."""
    out = tmp_path / "train.bin"
    (tmp_path / "long.txt").write_text("".join(DOCUMENTS) * 20)
    script = f"""
import os, signal
from torchmics.data import prepare, sources, tokenfile
sources.CHUNK_BYTES = 256
write = tokenfile.TokenFileWriter.write
def write_then_die(self, tokens):
    write(self, tokens)
    if self.num_tokens > 500:
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
tokenfile.TokenFileWriter.write = write_then_die
prepare.prepare_data([{str(tmp_path / "long.txt")!r}], {str(bpe[1])!r}, {str(out)!r}, workers=2)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    partial = tmp_path / ".train.bin.partial"
    assert not out.exists() and partial.stat().st_size > HEADER
    for name in (partial.name, "renamed.bin", "renamed.txt"):  # whatever it is called, it is not data
        target = tmp_path / name
        if not target.exists():
            target.write_bytes(partial.read_bytes())
        with pytest.raises(ValueError, match="is an unfinished `torchmics prepare-data` output"):
            load_tokens(str(target))
    _prepare(tmp_path / "long.txt", "--tokenizer", bpe[1], "--out", out)  # a rerun replaces the partial file
    assert _documents(out, bpe[0]) == ["".join(DOCUMENTS) * 20] and not partial.exists()


def test_a_failing_run_removes_its_partial_file(bpe, tmp_path, capsys):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut sh\n')
    out = tmp_path / "train.bin"
    assert main(["prepare-data", str(tmp_path), "--tokenizer", str(bpe[1]), "--out", str(out)]) == 2
    assert "bad.jsonl, line 2: not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def _bad_inputs(d: Path, tokenizer: Path) -> dict[str, tuple[list[str], str]]:
    text = d / "doc.txt"
    text.write_text("some text")
    (d / "rows.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    (d / "rows.json").write_text("[]")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    pq.write_table(pa.table({"content": ["x"]}), d / "rows.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), d / "ints.parquet")
    (d / "blank.jsonl").write_text('{"text": null}\n\n{"text": ""}\n')
    no_eos = save(large_word_level(10, last_token="<pad>"), d / "noeos.json")
    (d / "no-tokenizer").mkdir()
    (d / "no-tokenizer" / "tokenizer_config.json").write_text("{}")
    (d / "empty").mkdir()
    (d / "texts").mkdir()
    (d / "texts" / "a.txt").write_text("text")
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    base = ["--tokenizer", str(tokenizer), "--out", str(d / "o.bin")]
    return {
        "missing input": ([str(d / "nope.txt"), *base], r"input .*nope.txt does not exist"),
        "folder without a tokenizer": (
            [str(text), "--tokenizer", str(d / "no-tokenizer"), "--out", "o"],
            r"no-tokenizer holds no tokenizer.json and transformers cannot load a tokenizer from it",
        ),
        "empty tokenizer folder": (
            [str(text), "--tokenizer", str(d / "empty"), "--out", "o"], r"tokenizer folder .*empty is empty; give a"
        ),
        "a model config for a tokenizer": (
            [str(text), "--tokenizer", str(d / "config.json"), "--out", "o"],
            r"config.json is not a Hugging Face tokenizers file \(a tokenizer.json\)",
        ),
        "an input twice": ([str(d / "texts"), str(d / "texts" / "a.txt"), *base], r"input .*a.txt is given twice"),
        "missing tokenizer": (
            [str(text), "--tokenizer", str(d / "t.json"), "--out", "o"],
            r"tokenizer .*t.json does not exist",
        ),
        "not a tokenizer": (
            [str(text), "--tokenizer", str(text), "--out", "o"],
            r"doc.txt is not a Hugging Face tokenizers file",
        ),
        "jsonl field": (
            [str(d / "rows.jsonl"), *base],
            r"rows.jsonl, line 1: no field 'text' \(it has: content, id\); pass --text-field",
        ),
        "parquet column": ([str(d / "rows.parquet"), *base], r"rows.parquet has no column 'text' \(it has: content\)"),
        "parquet type": ([str(d / "ints.parquet"), *base], r"column 'text' holds int64, not strings"),
        ".json": ([str(d / "rows.json"), *base], r"rows.json: a .json file is read neither as JSON Lines"),
        "not utf-8": ([str(d / "latin1.txt"), *base], r"latin1.txt is not UTF-8 text \(byte 3"),
        "separator": ([str(text), *base, "--separator", "<nope>"], r"--separator '<nope>' is not a token of"),
        "no eos": (
            [str(text), "--tokenizer", str(no_eos), "--out", str(d / "o.bin")],
            r"names no eos_token .*pass --separator",
        ),
        "out exists": (
            [str(text), "--tokenizer", str(tokenizer), "--out", str(text)],
            r"--out .*doc.txt exists; pass --overwrite",
        ),
        "out is input": (
            [str(text), *base[:2], "--out", str(text), "--overwrite"],
            r"--out .*doc.txt is also an input",
        ),
        "out is a folder": ([str(text), *base[:2], "--out", str(d)], r"--out .* is a directory"),
        "jsonl type": ([str(d / "rows.jsonl"), *base, "--text-field", "id"], r"field 'id' is a int, not a string"),
        "no text": (
            [str(d / "blank.jsonl"), *base],
            r"the inputs hold no text to tokenize \(1 files, 3 empty documents\)",
        ),
        "workers": ([str(text), *base, "--workers", "0"], r"--workers must be >= 1"),
    }


def test_bad_input_is_a_clear_error(bpe, tmp_path, capsys):
    for case, (args, message) in _bad_inputs(tmp_path, bpe[1]).items():
        assert main(["prepare-data", *args]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("torchmics prepare-data: error: ") and re.search(message, err), (case, err)
    assert not (tmp_path / "o.bin").exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
