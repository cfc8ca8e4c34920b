"""The model a run trains: built on ``meta``, prepared per block, sharded, then filled on each rank.

No rank ever holds the whole model: ``shard`` allocates and initializes only this rank's shards
(see :mod:`torchmics.materialize`), and pretrained weights are read slice by slice into them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

import torchmics
from torchmics._fsdp import checkpoint_wrapper
from torchmics.models import build_model
from torchmics.models.gpt import GPT, ModelInfo, hf_config_file
from torchmics.pretrained import has_pretrained_weights, mismatches, read_pretrained
from torchmics.dtypes import replica_hop_format
from torchmics.topology import Topology
from torchmics.train.config import TrainConfig
from torchmics.wrapping import compile_units


def build_on_meta(cfg: TrainConfig) -> tuple[nn.Module, ModelInfo]:
    """The configured model with its parameters on ``meta``: free whatever its size."""
    with torchmics.meta_init():
        return build_model(cfg.model, cfg.seq_len)


def pretrained_folder(cfg: TrainConfig) -> str | None:
    """The folder whose weights the run starts from: ``--model hf:DIR`` holding safetensors, unless ``--random-init``."""
    if not cfg.model.startswith("hf:") or cfg.random_init:
        return None
    folder = os.path.dirname(hf_config_file(cfg.model)) or "."
    return folder if has_pretrained_weights(folder) else None


def check_pretrained(cfg: TrainConfig, model: nn.Module) -> None:
    """Before spawning: the pretrained folder's tensors fit ``model`` (names, shapes, dtypes), from headers only."""
    folder = pretrained_folder(cfg)
    if folder is None:
        return
    problems = mismatches(model, read_pretrained(folder))
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"the weights in {folder} do not fit --model {cfg.model}: {'; '.join(problems[:5])}{more}; "
                         "pass --random-init to train from scratch")


def shard_model(model: nn.Module, cfg: TrainConfig, topo: Topology, reshard_after_forward: bool = True) -> nn.Module:
    """Prepare and shard ``model`` (built by :func:`build_on_meta`); each rank initializes its shards."""
    return torchmics.shard(prepare_model(model, cfg), topo, mixed_precision=mixed_precision(cfg),
                           shard_optimizer_across_replicas=cfg.optimizer_over_replicas,
                           offload=cfg.cpu_offload, init_seed=cfg.seed, reshard_after_forward=reshard_after_forward)


def fill_weights(model: nn.Module, cfg: TrainConfig) -> str:
    """Load the pretrained weights ``cfg`` names, if any, into the sharded ``model``; says where its weights came from.

    A run resuming from a checkpoint skips this: the checkpoint's weights replace whatever is read here.
    """
    folder = _agreed(pretrained_folder(cfg))
    if folder is None:
        return f"random init (seed {cfg.seed}), each rank its own shards"
    loaded = torchmics.load_pretrained(model, folder)
    return f"pretrained from {folder} ({len(loaded.shapes)} tensors, {loaded.num_bytes / 2**30:.2f} GiB)"


def _agreed(folder: str | None) -> str | None:
    """Rank 0's answer for every rank: one that saw no weights would train while the others load them."""
    choice = [folder]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Activation checkpointing and compilation go on per block, before sharding (as torchtitan does)."""
    if cfg.activation_checkpointing:
        if isinstance(model, GPT):
            model.blocks = nn.ModuleList(checkpoint_wrapper(block) for block in model.blocks)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_units(model)
    return model


def mixed_precision(cfg: TrainConfig) -> torchmics.MixedPrecision:
    """bf16 compute reduces in fp32 inside the partition group; the replica hop may pick its own dtype."""
    compute = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    reduce = torch.float32 if compute is not None else None
    return torchmics.MixedPrecision(compute, reduce, replica_hop_format(cfg.replica_reduce_dtype, cfg.error_feedback))
