"""Turning "auto" settings into numbers: how many processes, how many nodes, which partition size.

Everything here is decided from the configuration and the environment alone, so the launcher can
decide (and reject bad input) before spawning, and every rank under torchrun decides the same.
"""

from __future__ import annotations

import os

import torch

from torchmics.models.gpt import ModelInfo
from torchmics.plan.auto import Job, recommend_partition_size, single_rank_must_reshard
from torchmics.plan.strategy import options
from torchmics.topology import validate
from torchmics.train.config import TrainConfig

CPU_DEFAULT_NPROC, CPU_DEFAULT_NODES = 4, 2  # the smallest world with a hierarchical partition group


def local_launch_shape(cfg: TrainConfig) -> tuple[int, int]:
    """(processes, emulated nodes) for a run this machine spawns itself."""
    gpus = torch.cuda.device_count()
    nproc = cfg.nproc or gpus or CPU_DEFAULT_NPROC
    if cfg.emulate_nodes:
        return nproc, cfg.emulate_nodes
    # On CPU two emulated nodes let the hierarchical collectives run, where the processes split evenly.
    nodes = 1 if gpus or nproc % CPU_DEFAULT_NODES else CPU_DEFAULT_NODES
    return nproc, nodes


def job_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(world size, GPUs per node) of the running job, from torchrun's (or our launcher's) environment."""
    world = int(os.environ["WORLD_SIZE"])
    return world, cfg.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))


def resolve_partition_size(cfg: TrainConfig, info: ModelInfo, world: int, gpus_per_node: int) -> int:
    """The configured partition size, or the planner's choice for ``auto`` (validated either way).

    On CPU there is no memory limit worth modelling, so ``auto`` shards over the whole world, which
    exercises every collective (hierarchical ones too when the world spans emulated nodes). A
    ``--fault-tolerant`` job is one replica group: its partition group is its world.
    """
    if cfg.fault_tolerant:  # the job is one replica group: its world is one partition group
        size = world
        if cfg.partition_size not in ("auto", str(world)):
            raise ValueError(f"--fault-tolerant: each replica group is one partition group, so --partition-size must "
                             f"be its world size {world} (or auto), got {cfg.partition_size}")
    elif cfg.partition_size != "auto":
        size = int(cfg.partition_size)
    elif torch.cuda.is_available():
        size = recommend_partition_size(info, planner_job(cfg, world, gpus_per_node))
    else:
        size = world
    validate(world, gpus_per_node, size)
    return size


def resolve_reshard_after_forward(cfg: TrainConfig, info: ModelInfo, world: int, gpus_per_node: int,
                                  partition_size: int) -> bool:
    """``False`` (units kept gathered from forward to backward) where the planner keeps them
    (``Strategy.keeps_gathered``: a one-rank partition group without offload, as a plain loop keeps
    autocast's copies), unless on this GPU that copy would not fit (see :func:`torchmics.shard`)."""
    job = planner_job(cfg, world, gpus_per_node)
    if not job.options.keeps_gathered(partition_size):
        return True
    return torch.cuda.is_available() and single_rank_must_reshard(info, job)


def planner_job(cfg: TrainConfig, world: int, gpus_per_node: int) -> Job:
    """The run in the planner's terms: every option that changes memory or speed, as ``train`` applies it.

    Compute in ``--mixed-precision``, gradients reduced in fp32 inside the partition group (see
    train/build.py), the replica hop in ``--replica-reduce-dtype``.
    """
    shared = options(cfg.mixed_precision, "fp32", cfg.replica_reduce_dtype, cfg.optimizer_over_replicas, cfg.cpu_offload,
                     cfg.error_feedback)
    return Job(world, gpus_per_node, (cfg.emulate_nodes or 1) > 1, cfg.micro_batch, cfg.accum,
               cfg.activation_checkpointing, shared)
