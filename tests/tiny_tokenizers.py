"""Tokenizers built inside the tests (nothing downloaded) and a small corpus of awkward documents."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"

DOCUMENTS = [
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé, 日本語 and emoji 🎉 survive byte-level BPE.\n\n\nTrailing blank lines too.\n",
    "a document that mentions <|endoftext|> in its text is still one document",
    "x" * 3000,  # long enough to be cut into pieces when chunks are small
    "\tindented\r\nwindows line ends\r\n",
]


def byte_bpe(vocab_size: int, corpus: list[str] = DOCUMENTS) -> Tokenizer:
    """A byte-level BPE (GPT-2's kind): decoding gives back exactly the text that was encoded."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def large_word_level(vocab_size: int, last_token: str = EOT) -> Tokenizer:
    """Words ``w0 ... w{vocab_size - 2}`` and ``last_token``: ids beyond uint16 when large."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {last_token: vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([last_token])
    return tokenizer


def save(tokenizer: Tokenizer, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
