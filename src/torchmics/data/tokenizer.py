"""Local tokenizers: load one (a ``tokenizer.json`` or a transformers folder), name it, find its separator.

Nothing is downloaded. A tokenizer's identity is the sha256 of the parts of its Hugging Face
`tokenizers` serialization that decide which ids a text becomes (`ENCODING_PARTS`: vocabulary and
merges, special tokens, normalizer, pre-tokenizer). The same tokenizer gives the same hash however its
file was formatted, and whatever post-processor (BOS/EOS templates, which prepare-data does not apply),
truncation or padding a copy of it was saved with: transformers' `save_pretrained` adds a post-processor,
say. `torchmics train` compares the hash a token file records with the tokenizer a ``--model hf:DIR``
folder ships.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# End-of-document tokens of common tokenizer families (GPT-2 / Llama 3 / Llama 2, T5 / Gemma / others),
# tried in order when the tokenizer's own configuration names no eos_token.
KNOWN_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
ENCODING_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


@dataclass(frozen=True)
class LocalTokenizer:
    """A tokenizer as `tokenizers` JSON (what worker processes rebuild it from) and what it is called."""

    name: str
    json: str
    sha256: str
    vocab_size: int
    eos_token: str | None

    def build(self):
        """A `tokenizers.Tokenizer` that encodes whole documents exactly as written.

        Truncation and padding (some ``tokenizer.json`` files enable them) would cut or pad documents;
        special tokens written in the text are encoded as text, so a document that mentions
        ``<|endoftext|>`` cannot fake a document boundary.
        """
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.json)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = True
        return tokenizer

    def separator(self, requested: str | None) -> tuple[str, int]:
        """The token written after every document and its id: ``requested``, else the tokenizer's eos."""
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(self.json).get_vocab(with_added_tokens=True)
        if requested is not None:
            if requested not in vocab:
                raise ValueError(f"--separator {requested!r} is not a token of {self.name}")
            return requested, vocab[requested]
        for token in (self.eos_token, *KNOWN_SEPARATORS):
            if token in vocab:
                return token, vocab[token]
        raise ValueError(
            f"{self.name} names no eos_token and has none of {', '.join(KNOWN_SEPARATORS)}: pass --separator "
            "TOKEN, the token that ends a document"
        )


def load_tokenizer(path: str | Path) -> LocalTokenizer:
    """Load a ``tokenizer.json`` file, or a folder holding one, or a transformers tokenizer folder."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer {path} does not exist (give a tokenizer.json or a folder holding one)")
    folder = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        backend = _from_file(file)
    elif not any(path.iterdir()):  # transformers would answer with advice on sentencepiece and tiktoken
        raise ValueError(f"tokenizer folder {path} is empty; give a tokenizer.json, or the folder of a Hugging Face "
                         "model that ships its tokenizer")
    else:
        backend = _from_transformers(path)
    serialized = backend.to_str()
    return LocalTokenizer(
        name=str(path.resolve()),
        json=serialized,
        sha256=_identity(serialized),
        vocab_size=max(backend.get_vocab(with_added_tokens=True).values()) + 1,  # ids need not be dense
        eos_token=_configured_eos(folder),
    )


def model_tokenizer(model: str) -> LocalTokenizer | None:
    """The tokenizer a ``hf:DIR`` (or ``hf:DIR/config.json``) model folder ships; None when it ships none."""
    if not model.startswith("hf:"):
        return None
    path = Path(model.removeprefix("hf:"))
    folder = path if path.is_dir() else path.parent
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return load_tokenizer(folder)


def _identity(serialized: str) -> str:
    parts = {key: value for key, value in json.loads(serialized).items() if key in ENCODING_PARTS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _from_file(file: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError("reading a tokenizer needs Hugging Face tokenizers: pip install 'torchmics[data]'") from err
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises its own exception type for a bad file
        raise ValueError(f"{file} is not a Hugging Face tokenizers file (a tokenizer.json): {err}") from err


def _from_transformers(folder: Path):
    """A folder without tokenizer.json (a SentencePiece model, say): transformers converts it."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"{folder} has no tokenizer.json; converting its tokenizer needs transformers: pip install 'torchmics[hf]'"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError or KeyError by case
        raise ValueError(
            f"{folder} holds no tokenizer.json and transformers cannot load a tokenizer from it: {err}"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"transformers loads {folder}'s tokenizer only as a slow (Python) tokenizer; save a tokenizer.json"
        )
    return tokenizer.backend_tokenizer


def _configured_eos(folder: Path) -> str | None:
    """``eos_token`` of tokenizer_config.json or special_tokens_map.json (a string, or a dict with content)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None
