import re

import numpy as np
import pytest
import torch
from tiny_tokenizers import DOCUMENTS, EOT, byte_bpe, save
from transformers import GPT2Config, PreTrainedTokenizerFast

from torchmics.cli import main
from torchmics.data.prepare import prepare_data
from torchmics.train import command
from torchmics.train.data import BatchSampler, check_model_fits, load_tokens

TOKENS = np.arange(1000, dtype=np.uint16)  # token i sits at position i: a window's start is its first token


def test_batches_are_deterministic_and_vary_by_step():
    a = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=1)
    b = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=1)
    torch.testing.assert_close(a.batch(5, 2), b.batch(5, 2))
    assert not torch.equal(a.batch(5, 2)[0], a.batch(5, 3)[0])
    assert not torch.equal(a.batch(5, 2)[0], a.batch(6, 2)[0])
    assert not torch.equal(a.batch(5, 2)[0], BatchSampler(TOKENS, 16, 8, seed=2).batch(5, 2)[0])


def test_rank_slices_concatenate_to_global_batch():
    world = 4
    samplers = [BatchSampler(TOKENS, 16, 8, rank=r, world_size=world, seed=3) for r in range(world)]
    x_all, y_all = samplers[0].global_batch(7, 1)
    parts = [s.batch(7, 1) for s in samplers]
    assert all(x.shape == (2, 16) for x, _ in parts)
    torch.testing.assert_close(torch.cat([x for x, _ in parts]), x_all)
    torch.testing.assert_close(torch.cat([y for _, y in parts]), y_all)


def test_targets_are_inputs_shifted_by_one():
    x, y = BatchSampler(TOKENS, 16, 4).global_batch(0)
    assert x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # each row is a contiguous window of the token stream
        torch.testing.assert_close(row_y, torch.arange(row_x[0].item() + 1, row_x[0].item() + 17))


def test_stdlib_corpus():
    data = load_tokens(None, seq_len=256)
    assert data.vocab_size == 256
    assert data.train.dtype == np.uint8
    assert len(data.val) >= 257 and len(data.train) > 19 * len(data.val) - 20
    assert "stdlib" in data.source
    assert b"def " in data.train[:100_000].tobytes()
    np.testing.assert_array_equal(load_tokens(None).val[:1000], data.val[:1000])


def test_bin_round_trip(tmp_path):
    tokens = (np.arange(4000) * 7 % 50000).astype(np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    data = load_tokens(str(path))
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tokens)
    assert len(data.val) == 200
    assert data.vocab_size == int(tokens.max()) + 1


def test_text_folder_is_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"B" * 100)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_bytes(b"A" * 100)
    (tmp_path / ".hidden").write_bytes(b"H" * 100)
    data = load_tokens(str(tmp_path))
    assert (data.train.tobytes() + data.val.tobytes()) == b"A" * 100 + b"B" * 100
    assert data.vocab_size == 256 and len(data.val) == 10
    single = load_tokens(str(tmp_path / "b.txt"), seq_len=8)
    assert len(single.val) == 9


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="data path .*nope does not exist"):
        load_tokens(str(tmp_path / "nope"))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd number"):
        load_tokens(str(odd))
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="train split: 35 tokens, need at least 65"):
        load_tokens(str(small), seq_len=64)
    with pytest.raises(ValueError, match="100 tokens, need at least 201"):
        BatchSampler(np.zeros(100, np.uint8), seq_len=200, global_batch_size=4)
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by world size 4"):
        BatchSampler(TOKENS, 16, 6, rank=0, world_size=4)


# ---- token files of `torchmics prepare-data` -------------------------------------------------------


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """A token file of the test documents (many copies) made with a 400-token BPE; its tokenizer's path."""
    root = tmp_path_factory.mktemp("tokens")
    tokenizer = save(byte_bpe(400), root / "bpe" / "tokenizer.json")
    for i in range(20):
        (root / "docs" / f"{i:02}.txt").parent.mkdir(exist_ok=True)
        (root / "docs" / f"{i:02}.txt").write_text(DOCUMENTS[i % len(DOCUMENTS)])
    prepare_data([str(root / "docs")], str(tokenizer), str(root / "train.tok"), workers=1)
    return root / "train.tok", tokenizer


def test_token_file_is_memory_mapped_with_its_header(token_file):
    path, tokenizer = token_file
    raw = np.frombuffer(path.read_bytes()[4096:], dtype="<u2")  # the documented layout: tokens from byte 4096
    data = load_tokens(str(path), seq_len=16, verify=True)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), raw)
    assert len(data.val) == max(17, -(-len(raw) * 5 // 100))
    assert data.vocab_size == 400 and data.header.num_documents == 20 and data.header.tokenizer == str(tokenizer)
    assert f"token file {path} ({len(raw):,} uint16 tokens, 20 documents" in data.source
    x, y = BatchSampler(data.train, 16, 4, seed=0).global_batch(3)
    windows = np.lib.stride_tricks.sliding_window_view(raw, 17)
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert all((windows == row).all(axis=1).any() for row in rows)  # each row: 17 consecutive tokens of the file


def test_damaged_token_files_are_refused(token_file, tmp_path):
    good = token_file[0].read_bytes()
    cases = {
        "flipped.tok": (good[:-3] + bytes([good[-3] ^ 1]) + good[-2:], "the file is damaged; prepare it again"),
        "truncated.tok": (good[:-2], r"has \d+ bytes but its header promises \d+ uint16 tokens .*truncated or damaged"),
        "newer.tok": (good[:8] + (2).to_bytes(4, "little") + good[12:], "format version 2; this torchmics reads version 1"),
        "garbled.tok": (good[:20] + b"#" + good[21:], "the token file header is damaged"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            load_tokens(str(tmp_path / name), verify=True)
    load_tokens(str(tmp_path / "flipped.tok"))  # the size is right: only the checksum (verify) can tell


def _model_folder(path, vocab_size: int, tokenizer=None):
    """A transformers GPT-2 config (random weights, nothing downloaded) with, optionally, its own tokenizer."""
    shape = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    GPT2Config(**shape).save_pretrained(path)
    if tokenizer is not None:  # saved the way transformers saves it (a post-processor is added)
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT).save_pretrained(path)
    return f"hf:{path}"


def test_model_must_cover_the_vocabulary_and_ship_the_same_tokenizer(token_file, tmp_path):
    data = load_tokens(str(token_file[0]))
    with pytest.raises(ValueError, match=r"needs a vocabulary of 400 tokens \(tokenizer .*bpe/tokenizer.json\) but model tiny has 256"):
        check_model_fits(data, "tiny", 256)
    same = _model_folder(tmp_path / "same", 400, byte_bpe(400))
    check_model_fits(data, same, 400)
    check_model_fits(data, _model_folder(tmp_path / "none", 512), 512)  # no tokenizer shipped: nothing to compare
    other = _model_folder(tmp_path / "other", 400, byte_bpe(400, DOCUMENTS + ["more merges, other merges"]))
    with pytest.raises(ValueError, match=r"was tokenized with .*bpe/tokenizer.json \(sha256 [0-9a-f]{12}...\) but model "
                       r"hf:.*other/config.json ships another tokenizer, .*other \(sha256 [0-9a-f]{12}...\): prepare the data with"):
        check_model_fits(data, f"{other}/config.json", 400)
    bytes_data = load_tokens(str(tmp_path / "same" / "config.json"))  # read as text bytes: no tokenizer recorded
    check_model_fits(bytes_data, other, 400)


def test_train_refuses_mismatches_before_spawning(token_file, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was spawned for input that preflight should have rejected")

    monkeypatch.setattr(command, "spawn", refuse)
    other = _model_folder(tmp_path / "other", 400, byte_bpe(400, DOCUMENTS + ["other merges"]))
    cases = {"tiny": "needs a vocabulary of 400 tokens .* but model tiny has 256", other: "ships another tokenizer"}
    for model, message in cases.items():
        flags = ["--model", model, "--seq-len", "16", "--data", str(token_file[0]), "--out", str(tmp_path / "run")]
        assert main(["train", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("torchmics train: error: ") and re.search(message, err), err
