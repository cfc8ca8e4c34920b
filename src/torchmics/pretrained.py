"""Pretrained weights straight into shards: each rank reads only the slices it owns from safetensors files.

A Hugging Face folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
safetensors files are memory-mapped and ``get_slice`` reads just the requested rows, so loading a
175B checkpoint into 128 ranks costs each rank ``1/P`` of the bytes and no full tensor in memory.
Every rank checks the files' headers against the model (names, shapes, dtypes) before it reads a
byte, and the ranks agree on the outcome, so a mismatched folder raises the same clear error
everywhere instead of leaving some ranks waiting in the first collective of training.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Shard

from torchmics.sharding import shard_state
from torchmics.topology import current_device

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Pretrained:
    """Where each tensor of a folder lives, and its header: read without touching the data."""

    folder: str
    files: dict[str, str]  # tensor name -> file path
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]

    @property
    def num_bytes(self) -> int:
        return sum(os.path.getsize(path) for path in set(self.files.values()))


def has_pretrained_weights(folder: str) -> bool:
    """Whether ``folder`` holds safetensors weights (single file or an index of shards)."""
    return os.path.isfile(os.path.join(folder, SINGLE_FILE)) or os.path.isfile(os.path.join(folder, INDEX_FILE))


def read_pretrained(folder: str) -> Pretrained:
    """The tensor index of a Hugging Face folder; a clear error if it holds no safetensors weights."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        files = None
    else:
        raise FileNotFoundError(
            f"{folder} holds no pretrained weights: expected {SINGLE_FILE} or {INDEX_FILE} (PyTorch .bin "
            "checkpoints are not read; convert them with transformers' save_pretrained(safe_serialization=True))."
        )
    shapes, dtypes, located = {}, {}, {}
    for path in sorted(set(files.values())) if files else [os.path.join(folder, SINGLE_FILE)]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index} lists {os.path.basename(path)}, which is not in {folder}")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                header = f.get_slice(name)
                shapes[name], dtypes[name], located[name] = list(header.get_shape()), header.get_dtype(), path
    return Pretrained(folder, located, shapes, dtypes)


def load_pretrained(model: nn.Module, folder: str) -> Pretrained:
    """Fill a model returned by :func:`torchmics.shard` with the weights in ``folder``; every rank calls it.

    Names are the unwrapped model's ``state_dict()`` keys (a Hugging Face model's own names). A tied
    weight may be stored under either of its names; names the model lists in
    ``_keys_to_ignore_on_load_unexpected`` may be extra. Floating-point tensors are cast to the
    parameter's dtype (bf16 files into fp32 master weights); any other difference is an error.
    Returns the folder's index (for reporting what was loaded).
    """
    shard_state(model)
    try:  # a rank that cannot read the folder (node-local disk, a half-synced copy) must not leave the others waiting
        pretrained, unreadable = read_pretrained(folder), []
    except (OSError, ValueError, json.JSONDecodeError) as err:
        pretrained, unreadable = None, [f"{type(err).__name__}: {err}"]
    _agree(unreadable, f"cannot read the pretrained weights in {folder}", "Nothing was loaded.")
    _agree(mismatches(model, pretrained), f"{folder} does not fit this model", "Nothing was loaded.")
    targets = model.state_dict(keep_vars=True)
    failure = None
    try:
        _read_owned_slices(targets, pretrained)
    except Exception as err:  # agreed on below, so no rank trains on while another stopped
        failure = f"{type(err).__name__}: {err}"
    _agree([failure] if failure else [], f"reading {folder} failed", "The model is partly loaded: build it afresh.")
    return pretrained


def mismatches(model: nn.Module, pretrained: Pretrained) -> list[str]:
    """Every name, shape or dtype of ``pretrained`` that does not fit ``model``, in words.

    Reads only headers and works on a model on ``meta`` too, so a launcher can check before spawning.
    """
    targets = model.state_dict(keep_vars=True)
    problems = []
    for name, tensor in targets.items():
        source = _source_name(name, targets, pretrained)
        if source is None:
            problems.append(f"{name}: in the model, not in the folder")
        elif pretrained.shapes[source] != list(tensor.shape):
            problems.append(f"{name}: folder {pretrained.shapes[source]} vs model {list(tensor.shape)}")
        elif not _castable(pretrained.dtypes[source], tensor.dtype):
            problems.append(f"{name}: folder dtype {pretrained.dtypes[source]} vs model {tensor.dtype}")
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    extra = [n for n in pretrained.shapes if n not in targets and not any(p.search(n) for p in ignored)]
    problems += [f"{name}: in the folder, not in the model" for name in extra]
    return problems


def _source_name(name: str, targets: dict[str, torch.Tensor], pretrained: Pretrained) -> str | None:
    """The folder's name for ``name``: itself, or another name of the same (tied) tensor."""
    if name in pretrained.shapes:
        return name
    tied = [other for other, t in targets.items() if t is targets[name] and other in pretrained.shapes]
    return tied[0] if tied else None


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_EXACT_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _castable(stored: str, dtype: torch.dtype) -> bool:
    return stored in _FLOAT_DTYPES if dtype.is_floating_point else _EXACT_DTYPES.get(stored) == dtype


def _read_owned_slices(targets: dict[str, torch.Tensor], pretrained: Pretrained) -> None:
    """Copy into each local shard the rows of its file that this rank owns (each tensor once)."""
    done: set[int] = set()
    by_file: dict[str, list[tuple[str, str]]] = {}  # file -> (model name, folder name)
    for name in targets:
        source = _source_name(name, targets, pretrained)
        by_file.setdefault(pretrained.files[source], []).append((name, source))
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name, source in names:
                    tensor = targets[name]
                    if id(tensor) in done:
                        continue
                    done.add(id(tensor))
                    stored = f.get_slice(source)
                    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                    local.copy_(stored[_owned_index(tensor)].to(local.dtype))


def _owned_index(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's part of a (possibly sharded) tensor, in global coordinates.

    FSDP2 shards dimension 0 in ``torch.chunk`` pieces over the mesh dimension of each ``Shard``
    placement; replicated dimensions take everything.
    """
    index = [slice(None)] * tensor.dim()
    if not isinstance(tensor, DTensor):
        return tuple(index)
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard):
            size = tensor.shape[placement.dim]
            pieces = tensor.device_mesh.size(mesh_dim)
            chunk = -(-size // pieces)
            start = min(size, chunk * tensor.device_mesh.get_local_rank(mesh_dim))
            index[placement.dim] = slice(start, min(size, start + chunk))
    owned = tuple(index)
    expected = [len(range(*s.indices(n))) for s, n in zip(owned, tensor.shape)]
    if expected != list(tensor.to_local().shape):
        raise RuntimeError(f"cannot place a local shard of shape {list(tensor.to_local().shape)} (expected "
                           f"{expected}): a sharding layout torchmics does not know; please report it")
    return owned


def _agree(problems: list[str], what: str, consequence: str, show: int = 5) -> None:
    """Raise on every rank if any rank found a problem (the first rank's words), else return on all."""
    failed = torch.tensor([1 if problems else 0], device=current_device())
    dist.all_reduce(failed)
    if not failed.item():
        return
    reports: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(reports, problems)
    rank, found = next((r, p) for r, p in enumerate(reports) if p)
    more = f"; and {len(found) - show} more" if len(found) > show else ""
    raise ValueError(f"{what} (rank {rank}): {'; '.join(found[:show]).rstrip('.')}{more}. {consequence}")
