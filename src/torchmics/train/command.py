"""`torchmics train`: check the configuration, then run here (torchrun) or spawn local ranks."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from torchmics import checkpoint
from torchmics.models import build_model
from torchmics.train.config import TrainConfig, build_parser, resolve_config
from torchmics.train.data import check_model_fits, load_tokens
from torchmics.train.launcher import LocalLaunch, restart_hazard, run_rank, spawn, under_torchrun
from torchmics.train.resolve import job_sizes, local_launch_shape, resolve_partition_size


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

    Resolves ``--partition-size auto`` into ``cfg``. Returns how to spawn local ranks, or None when
    torchrun already started them (then each rank runs this same check on its own).
    """
    with torch.device("meta"):
        _, info = build_model(cfg.model, cfg.seq_len)
    # The checksum is read once per node: in the launcher, or in local rank 0 under torchrun.
    data = load_tokens(cfg.data, info.seq_len, verify=os.environ.get("LOCAL_RANK", "0") == "0")
    check_model_fits(data, cfg.model, info.vocab_size)
    _check_out_dir(cfg)
    if under_torchrun():
        _warn_of_restart_hazard()
        launch, (world, gpus_per_node) = None, job_sizes(cfg)
    else:
        nproc, nodes = local_launch_shape(cfg)
        launch = LocalLaunch(nproc, nodes, use_gpus=torch.cuda.is_available())
        world, gpus_per_node = nproc, cfg.gpus_per_node or launch.procs_per_node
    cfg.partition_size = str(resolve_partition_size(cfg, info, world, gpus_per_node))
    return launch


def _warn_of_restart_hazard() -> None:
    """Once per job (rank 0): a failed restart is found only when a worker dies, long after the start."""
    hazard = restart_hazard()
    if hazard is not None and os.environ["RANK"] == "0":
        print(f"torchmics train: warning: {hazard}", file=sys.stderr)


def _check_out_dir(cfg: TrainConfig) -> None:
    """Refuse to start a fresh run over another run's checkpoints, and a ``--resume`` that names none.

    A fresh run would fail at its first save (checkpoints are never overwritten) after wasting its
    steps; saying so now also tells the user which flag they probably forgot.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a directory (or not exist yet)")
    existing = checkpoint.latest_checkpoint(cfg.out)
    if cfg.resume is None and existing is not None:
        raise ValueError(
            f"--out {out} already holds checkpoints of a run (newest: {existing}); "
            "pass --resume auto to continue it, or choose another --out"
        )
    if cfg.resume not in (None, "auto") and not (Path(cfg.resume) / checkpoint.METADATA_FILE).is_file():
        raise ValueError(
            f"--resume {cfg.resume} is not a complete checkpoint (no {checkpoint.METADATA_FILE} in it); "
            "pass a step_<N> directory of a run, or --resume auto for the newest one in --out"
        )


def _train_rank(cfg: TrainConfig) -> None:
    from torchmics.train.loop import train

    # torch >= 2.13 renames the tensor collectives FSDP2 calls; the old names still work on 2.9-2.13.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    train(cfg)


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    launch = preflight(cfg)
    if launch is None:
        run_rank(_train_rank, cfg)
    else:
        spawn(_train_rank, launch, cfg)
