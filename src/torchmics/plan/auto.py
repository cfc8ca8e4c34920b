"""``torchmics train --partition-size auto`` on GPUs: the planner's choice for this machine and job.

The job knows its model, micro-batch, accumulation and precision; the cluster is read off the local
GPU. Only memory is measured there (``total_memory``): compute, links and network come from the shipped
profile of that GPU model, and between emulated nodes from the socket link measured on our own host.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torchmics.plan.cluster import (
    PROFILES,
    ClusterProfile,
    emulated_nodes,
    with_gpus_per_node,
)
from torchmics.plan.memory import GIB
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.planner import evaluate, plan, recommend
from torchmics.plan.strategy import Strategy

if TYPE_CHECKING:  # planning stays importable without building models
    from torchmics.models import ModelInfo

A100_80GB_ABOVE_GIB = 48  # between the 40 GB and 80 GB parts, whatever the driver reserves
UNKNOWN_GPU_STAND_IN = "a100-80gb-3200"


@dataclass(frozen=True)
class Job:
    """What ``train --partition-size auto`` knows of its run: shape, batch and the shared options."""

    world: int
    gpus_per_node: int
    emulated: bool
    micro_batch: int
    accum: int
    activation_checkpointing: bool
    options: Strategy


def recommend_partition_size(info: ModelInfo, job: Job, cluster: ClusterProfile | None = None) -> int:
    """The planner's partition size for ``info`` trained as ``job`` (on this machine's GPUs by default).

    Raises ``ValueError`` (the planner's message, naming the memory that runs out) when nothing fits.
    """
    cluster = cluster or local_cluster(job)
    nodes = job.world // job.gpus_per_node
    candidates = plan(_model_spec(info), cluster, nodes, job.micro_batch, job.accum, job.activation_checkpointing,
                      job.options)
    return recommend(candidates).partition_size


def single_rank_must_reshard(info: ModelInfo, job: Job, cluster: ClusterProfile | None = None) -> bool:
    """Whether, at partition size 1, the units kept gathered from forward to backward would not fit: then
    ``train`` reshards after forward (a cast per unit for the memory), as ``plan`` does."""
    cluster = cluster or local_cluster(job)
    nodes = job.world // job.gpus_per_node
    one_rank = job.options.with_sharding("mics", 1)
    return not evaluate(_model_spec(info), cluster, nodes, one_rank, job.micro_batch, job.accum,
                        job.activation_checkpointing).fits


def _model_spec(info: ModelInfo) -> ModelSpec:
    return dataclasses.replace(ModelSpec.from_name(info.name), num_params=info.num_params, seq_len=info.seq_len)


def local_cluster(job: Job) -> ClusterProfile:
    """The cluster this job runs on: the local GPU's profile with the memory it and the host report."""
    import torch

    memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    cluster = job_cluster(torch.cuda.get_device_name(0), memory_gib, job.gpus_per_node, job.emulated)
    return dataclasses.replace(cluster, host_gib=host_memory_gib())


def host_memory_gib() -> float:
    """This machine's memory, or its container's limit if lower: what the ranks of a node share."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()  # cgroup v2; "max" when unlimited
    except OSError:
        limit = "max"
    return min(physical, int(limit) if limit.isdigit() else physical) / GIB


def job_cluster(device_name: str, memory_gib: float, gpus_per_node: int, emulated: bool) -> ClusterProfile:
    """The cluster a job on ``device_name`` GPUs runs on: nodes of ``gpus_per_node``, real or emulated.

    Emulated nodes (``--emulate-nodes``) talk through NCCL's socket transport, not the GPU's usual
    network, so they get the socket link instead of the profile's.
    """
    host = gpu_profile(device_name, memory_gib)
    return with_gpus_per_node(emulated_nodes(host) if emulated else host, gpus_per_node)


def gpu_profile(device_name: str, memory_gib: float) -> ClusterProfile:
    """The shipped profile of this GPU model, with the memory the device reports.

    A GPU no profile describes gets an A100-80GB-class stand-in for compute, memory bandwidth, NVLink
    and network (stated in its ``source``): the partition size mostly follows memory, which is read
    off the device, while the speed estimates of such a profile are rough.
    """
    if "H200" in device_name:
        name = "h200-3200"
    elif "H100" in device_name:
        name = "h100-3200"
    elif "A100" in device_name:
        name = "a100-80gb-3200" if memory_gib > A100_80GB_ABOVE_GIB else "p4d"
    else:
        stand_in = PROFILES[UNKNOWN_GPU_STAND_IN]
        return dataclasses.replace(
            stand_in,
            name="local-" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-"),
            gpu=device_name,
            hbm_gib=memory_gib,
            source=f"Unknown GPU {device_name!r}: {memory_gib:.1f} GiB as the device reports; everything "
            f"else assumed as {stand_in.name} ({stand_in.peak_tflops:.0f} TFLOPS at MFU {stand_in.compute_mfu}).",
        )
    return dataclasses.replace(PROFILES[name], hbm_gib=memory_gib)
