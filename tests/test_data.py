import numpy as np
import pytest
import torch

from torchmics.train.data import BatchSampler, load_tokens

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
