"""Rank arithmetic for MiCS: partition groups, replication groups and their hierarchical sub-groups.

This is the one module that maps ranks to groups. `plan_topology` is a pure function of
(world size, GPUs per node, partition size), so the layout of a 1024-GPU job can be checked without
starting a single process; `init_mesh` turns that layout into process groups.

Layout (docs/design.md §2). Rank ``r = node * G + local_rank``; partition group ``g`` holds the consecutive
ranks ``[g*P, (g+1)*P)`` so that a group fills a node before it spans nodes; the replication group of
a rank holds the ranks with the same index in every partition group. When ``P > G > 1`` a partition
group spans ``P / G`` whole nodes and is *hierarchical*: its ``inter`` sub-groups join the ranks with
the same local rank (one per node) and its ``intra`` sub-groups join the ``G`` ranks of one node.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

RankGroups = tuple[tuple[int, ...], ...]

MESH_DIMS = ("replicate", "shard")


@dataclass(frozen=True)
class Topology:
    """Where every rank sits: which partition group shards its model states, which replicas mirror it.

    Built by :func:`plan_topology` (pure, no processes) or :func:`init_mesh` (which also fills in
    ``rank`` and the live ``mesh`` / ``inter_group`` / ``intra_group`` of the calling process).
    """

    world_size: int
    gpus_per_node: int
    partition_size: int
    partition_groups: RankGroups
    replication_groups: RankGroups
    inter_groups: RankGroups  # empty unless hierarchical
    intra_groups: RankGroups  # empty unless hierarchical
    rank: int | None = None
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)
    inter_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    intra_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    @property
    def num_replicas(self) -> int:
        """How many full copies of the model states exist (the replication group size)."""
        return self.world_size // self.partition_size

    @property
    def hierarchical(self) -> bool:
        """True when a partition group spans several nodes with several GPUs each."""
        return self.partition_size > self.gpus_per_node > 1

    @property
    def nodes_per_partition(self) -> int:
        return max(1, self.partition_size // self.gpus_per_node)

    def partition_index(self, rank: int) -> int:
        """Which partition group ``rank`` belongs to."""
        return rank // self.partition_size

    def shard_index(self, rank: int) -> int:
        """Which shard of the model states ``rank`` holds (its index inside its partition group)."""
        return rank % self.partition_size

    def describe(self) -> str:
        """One human-readable paragraph: what a user should check before a long run."""
        kind = "hierarchical (inter-node, then intra-node)" if self.hierarchical else "flat"
        spans = f"spans {self.nodes_per_partition} nodes" if self.partition_size > self.gpus_per_node else "inside one node"
        return (
            f"{self.world_size} ranks = {self.num_nodes} node{'s' if self.num_nodes > 1 else ''} x {self.gpus_per_node} per node; "
            f"partition size {self.partition_size} ({spans}, {kind} collectives), "
            f"{self.num_replicas} replica(s); partition groups {_short(self.partition_groups)}, "
            f"replication groups {_short(self.replication_groups)}"
        )


def _short(groups: RankGroups, limit: int = 4) -> str:
    def one(g: tuple[int, ...]) -> str:
        return str(list(g)) if len(g) <= 6 else f"[{g[0]}, {g[1]}, ..., {g[-1]}]"

    shown = ", ".join(one(g) for g in groups[:limit])
    return f"[{shown}{', ...' if len(groups) > limit else ''}]"


def valid_partition_sizes(world_size: int, gpus_per_node: int) -> list[int]:
    """Partition sizes that divide the world and are node-aligned (divide G, or are a multiple of G)."""
    return [
        p
        for p in range(1, world_size + 1)
        if world_size % p == 0 and (gpus_per_node % p == 0 or p % gpus_per_node == 0)
    ]


def validate(world_size: int, gpus_per_node: int, partition_size: int) -> None:
    """Raise ``ValueError`` naming what is wrong and what would be valid. Collective-free, so no hang."""
    _require_ints(world_size=world_size, gpus_per_node=gpus_per_node, partition_size=partition_size)
    if world_size < 1 or gpus_per_node < 1:
        raise ValueError(f"world size ({world_size}) and GPUs per node ({gpus_per_node}) must be >= 1")
    if world_size % gpus_per_node != 0:
        raise ValueError(
            f"gpus_per_node={gpus_per_node} is inconsistent with a world of {world_size} ranks: the world "
            f"must be whole nodes. Pass the number of processes per node (torchrun's LOCAL_WORLD_SIZE), "
            f"one of {[g for g in range(1, world_size + 1) if world_size % g == 0]}."
        )
    if partition_size not in valid_partition_sizes(world_size, gpus_per_node):
        raise ValueError(
            f"partition_size={partition_size} is not valid for {world_size} ranks with {gpus_per_node} "
            f"per node: it must divide the world size and either divide the GPUs per node or be a "
            f"multiple of it (node-aligned). Valid sizes: {valid_partition_sizes(world_size, gpus_per_node)}."
        )


def _require_ints(**sizes: object) -> None:
    """Sizes are counts of ranks: a float or a string would only fail later, inside the group arithmetic."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int (a number of ranks), got {value!r} ({type(value).__name__})")


def plan_topology(world_size: int, gpus_per_node: int, partition_size: int) -> Topology:
    """Compute every group of a MiCS job from its three sizes (pure: no process group needed)."""
    validate(world_size, gpus_per_node, partition_size)
    W, G, P = world_size, gpus_per_node, partition_size
    partitions = tuple(tuple(range(g * P, (g + 1) * P)) for g in range(W // P))
    replicas = tuple(tuple(range(i, W, P)) for i in range(P))
    inter: RankGroups = ()
    intra: RankGroups = ()
    if P > G > 1:
        inter = tuple(tuple(range(base + local, base + P, G)) for base in range(0, W, P) for local in range(G))
        intra = tuple(tuple(range(start, start + G)) for start in range(0, W, G))
    return Topology(W, G, P, partitions, replicas, inter, intra)


def ensure_process_group() -> None:
    """Start the default process group from torchrun's environment, or explain how to get one.

    NCCL when GPUs are present (each rank on the GPU of its ``LOCAL_RANK``), gloo otherwise.
    """
    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"No torch.distributed process group exists and the torchrun environment is incomplete "
            f"(missing {', '.join(missing)}). Launch with `torchrun --nproc-per-node=N script.py`, "
            f"use `torchmics train`, or call torch.distributed.init_process_group() before init_mesh()."
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")


def _default_gpus_per_node(world_size: int) -> int:
    """Ranks per node when ``init_mesh`` is not told: torchrun's ``LOCAL_WORLD_SIZE``, else the local GPUs.

    Without either (CPU ranks started by hand) every rank is taken to be on one node, which makes every
    partition group flat: rank 0 says so once, since a multi-node job would silently lose its hierarchy.
    """
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if torch.cuda.is_available():
        return min(torch.cuda.device_count(), world_size)
    if world_size > 1 and dist.get_rank() == 0:
        warnings.warn(
            f"init_mesh: neither gpus_per_node nor LOCAL_WORLD_SIZE is set, so all {world_size} ranks are assumed "
            "to be on one node (no hierarchical collectives). Pass init_mesh(gpus_per_node=N) with the ranks per "
            "node, or launch with torchrun, which sets LOCAL_WORLD_SIZE.",
            stacklevel=3,
        )
    return world_size


def device_type() -> str:
    """The device the live process group trains on: ``cuda`` for NCCL, else ``cpu``."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def current_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_mesh(partition_size: int | None = None, gpus_per_node: int | None = None) -> Topology:
    """Create the MiCS process groups and return the calling rank's :class:`Topology`.

    Starts the default process group from torchrun's environment when none exists (NCCL with GPUs,
    gloo without). ``partition_size=None`` shards over the whole world (ZeRO-3); ``gpus_per_node=None``
    reads ``LOCAL_WORLD_SIZE`` (or counts local GPUs; on CPU without either: one node, with a warning).
    Every rank validates the sizes before creating a group, so a bad size raises everywhere instead of
    hanging in a collective.
    """
    ensure_process_group()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if gpus_per_node is None:
        gpus_per_node = _default_gpus_per_node(world_size)
    topo = plan_topology(world_size, gpus_per_node, world_size if partition_size is None else partition_size)
    mesh = init_device_mesh(device_type(), (topo.num_replicas, topo.partition_size), mesh_dim_names=MESH_DIMS)
    inter_group = intra_group = None
    if topo.hierarchical:  # every rank creates every sub-group, in the same order (c10d's rule)
        inter_group, _ = dist.new_subgroups_by_enumeration([list(g) for g in topo.inter_groups])
        intra_group, _ = dist.new_subgroups_by_enumeration([list(g) for g in topo.intra_groups])
    return dataclasses.replace(topo, rank=rank, mesh=mesh, inter_group=inter_group, intra_group=intra_group)
