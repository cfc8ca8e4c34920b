"""Full, unsharded weights as safetensors: from a sharded checkpoint, or from a sharded model in memory.

``to`` ending in ``.safetensors`` is the file to write; anything else is a folder that gets
``model.safetensors`` and, for a Hugging Face model, ``config.json`` (see :mod:`torchmics.hf_config`
for where it comes from), so ``transformers.AutoModelForCausalLM.from_pretrained(to)`` loads it.
Keys are the unwrapped model's ``state_dict()`` keys (buffers, frozen and tied parameters included).
Nothing is overwritten; the destination is checked before any weight is read or gathered.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchmics.checkpoint import HF_CONFIG_FILE, MODEL_KEY, full_state_dict, on_rank0, verify_checkpoint
from torchmics.hf_config import HFConfig, config_text, model_config_text

WEIGHTS_FILE = "model.safetensors"


def export_checkpoint(path: str, to: str, hf_config: HFConfig | None = None) -> None:
    """Write the full model weights of checkpoint ``path`` as safetensors; no cluster needed.

    Runs in one process without a process group: DCP reads every chunk of every model tensor, the
    optimizer state is skipped. A folder export writes ``config.json`` from ``hf_config`` when given,
    else the config the checkpoint was saved with (none for a model that is not a Hugging Face one).
    The checkpoint's files are checked against their recorded sizes and checksums first.
    """
    verify_checkpoint(path)
    weights_file = _weights_file(to, hf_config)
    _refuse_existing(weights_file)
    saved_config = os.path.join(path, HF_CONFIG_FILE)
    if hf_config is None and os.path.isfile(saved_config):
        hf_config = saved_config
    config = config_text(hf_config) if hf_config is not None and weights_file != to else None
    _write(_read_model_weights(path), weights_file, config)


def export_model(model: nn.Module, to: str, hf_config: HFConfig | None = None) -> None:
    """Write the full weights of a model returned by :func:`torchmics.shard`; every rank calls it.

    Parameters are gathered one at a time to rank 0's CPU (:func:`torchmics.full_state_dict`), so no
    GPU ever holds the whole model; rank 0 writes. A folder export writes ``config.json`` from
    ``hf_config`` when given, else from the model's own config when it is a ``transformers``
    model. An error on rank 0 (an existing destination) raises on every rank.
    """
    weights_file = _weights_file(to, hf_config)
    config = model_config_text(model, hf_config) if weights_file != to else None
    on_rank0(lambda: _refuse_existing(weights_file))
    weights = full_state_dict(model)
    on_rank0(lambda: _write(_own_storage(weights), weights_file, config))


def _weights_file(to: str, hf_config: HFConfig | None) -> str:
    if not to.endswith(".safetensors"):
        return os.path.join(to, WEIGHTS_FILE)
    if hf_config is not None:
        raise ValueError(
            f"hf_config goes into a model folder's config.json, but {to} is a single .safetensors file: "
            "export to a folder, or leave hf_config out."
        )
    return to


def _refuse_existing(weights_file: str) -> None:
    if os.path.exists(weights_file):
        raise FileExistsError(f"{weights_file} already exists and is never overwritten; export to a new path")
    parent = os.path.dirname(weights_file)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot export into {parent}: it is a file, not a folder")


def _write(weights: dict[str, torch.Tensor], weights_file: str, config: str | None) -> None:
    """The weights file gets the mode any new file gets here (``0o666`` less the umask; safetensors alone
    would make it private to its owner), and ``config.json`` lies beside it when there is a config."""
    folder = os.path.dirname(weights_file) or "."
    os.makedirs(folder, exist_ok=True)
    save_file(weights, weights_file, metadata={"format": "pt"})
    os.chmod(weights_file, 0o666 & ~_umask())
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(config)


def _own_storage(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights appear under each name sharing one storage, which safetensors refuses: copy the repeats."""
    seen: set[int] = set()
    owned = {}
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        owned[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return owned


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_model_weights(path: str) -> dict[str, torch.Tensor]:
    """Every model tensor in full, read without a process group; keys without the ``model.`` prefix.

    Each name is read into a tensor of its own, so tied weights (saved under each name) share no
    storage and safetensors accepts them. DCP warns that it assumes one process when there is no
    process group: here that is the intent, so that one warning is silenced.
    """
    prefix = f"{MODEL_KEY}."
    entries = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in entries.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(weights, checkpoint_id=path, no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in weights.items()}
