"""`torchmics train`: check the configuration, then run here (torchrun) or spawn local ranks."""

from __future__ import annotations

import argparse
import warnings

import torch

from torchmics.models import build_model
from torchmics.train.config import TrainConfig, build_parser, resolve_config
from torchmics.train.data import load_tokens
from torchmics.train.launcher import LocalLaunch, spawn, under_torchrun
from torchmics.train.resolve import local_launch_shape, resolve_partition_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model with MiCS (CPU: 4 processes as 2 emulated nodes; GPUs: all local GPUs)",
        description="Train a GPT preset or a transformers causal LM with MiCS sharding. Without flags: "
        "the `small` GPT on the Python standard library's source, 4 CPU processes as 2 nodes x 2.",
    )
    build_parser(parser)
    parser.set_defaults(run=run)


def preflight(cfg: TrainConfig) -> LocalLaunch | None:
    """Every check that needs no process group, so bad input fails here and not inside N workers.

    Returns how to spawn local ranks, or None when torchrun already started them.
    """
    with torch.device("meta"):
        _, info = build_model(cfg.model, cfg.seq_len)
    data = load_tokens(cfg.data, info.seq_len)
    if data.vocab_size > info.vocab_size:
        raise ValueError(
            f"the data needs a vocabulary of {data.vocab_size} tokens but model {cfg.model} has {info.vocab_size}"
        )
    if under_torchrun():
        return None
    nproc, nodes = local_launch_shape(cfg)
    launch = LocalLaunch(nproc, nodes, use_gpus=torch.cuda.is_available())
    gpus_per_node = cfg.gpus_per_node or launch.procs_per_node
    cfg.partition_size = str(resolve_partition_size(cfg, info, nproc, gpus_per_node))
    return launch


def _train_rank(cfg: TrainConfig) -> None:
    from torchmics.train.loop import train

    # torch >= 2.13 renames the tensor collectives FSDP2 calls; the old names still work on 2.9-2.13.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    train(cfg)


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    launch = preflight(cfg)
    if launch is None:
        _train_rank(cfg)
    else:
        spawn(_train_rank, launch, cfg)
