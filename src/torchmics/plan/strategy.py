"""How model states are sharded and synchronised: the one choice the planner searches over.

DDP, ZeRO-3 and MiCS differ only in the partition size P (how many GPUs share one copy of the model
states) and in how gradients reach the other copies. Describing all three with one dataclass lets the
memory and cost models treat them uniformly: DDP is P = 1 without gathered units, ZeRO-3 is P = world
with a flat ring, MiCS is any node-aligned P in between.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torchmics.dtypes import DTYPES, QUANTIZED_DTYPES, REPLICA_HOP_FORMATS, wire_bytes
from torchmics.topology import validate

Kind = Literal["ddp", "zero3", "mics"]


@dataclass(frozen=True)
class Strategy:
    """One data-parallel strategy and its precision.

    ``hierarchical``: a partition group that spans nodes all-gathers inter-node first, then intra-node
    (MiCS's hierarchical communication); ZeRO-3 always uses NCCL's flat ring. ``two_hop``: under gradient accumulation
    the replication all-reduce runs once per step instead of every micro-step (MiCS's two-hop sync; also
    how DDP's ``no_sync`` is usually used). ``param_bytes`` is the dtype of gathered units and compute,
    ``reduce_bytes`` that of gradient collectives, ``replica_reduce_bytes`` that of the replica hop
    alone (precision per hop; ``None``: ``reduce_bytes``). ``optimizer_over_replicas`` additionally
    shards the optimizer states across replicas (W / P ways), which MiCS itself does not do: the
    replica hop becomes a reduce-scatter in backward and an all-gather of updated parameters (in
    ``param_bytes``) after the optimizer step. ``cpu_offload`` keeps the sharded parameters, gradients
    and optimizer states in host memory (FSDP2's ``CPUOffloadPolicy``) and steps the optimizer there.
    A quantized replica hop moves ``replica_reduce_bytes`` of about 1 per element (int8 or fp8 plus a
    scale per block); ``error_feedback_residuals`` counts its fp32 residuals (torchmics.quantized).
    ``reshard_after_forward`` is ``shard()``'s option of that name; ``None`` is what ``train`` picks: every
    unit kept gathered from forward to backward exactly at P = 1 without offload (:meth:`keeps_gathered`).
    """

    kind: Kind
    partition_size: int | None = None  # None: 1 for DDP, the world for ZeRO-3; required for MiCS
    hierarchical: bool = True
    two_hop: bool = True
    param_bytes: int = 2
    reduce_bytes: int = 4
    replica_reduce_bytes: float | None = None
    optimizer_over_replicas: bool = False
    cpu_offload: bool = False
    error_feedback_residuals: bool = False
    reshard_after_forward: bool | None = None

    @property
    def replica_hop_bytes(self) -> float:
        return self.replica_reduce_bytes or self.reduce_bytes

    @classmethod
    def ddp(cls, **precision: int | bool) -> Strategy:
        return cls("ddp", 1, hierarchical=False, **precision)

    @classmethod
    def zero3(cls, **precision: int | bool) -> Strategy:
        return cls("zero3", None, hierarchical=False, **precision)

    @classmethod
    def mics(cls, partition_size: int, **options: int | bool) -> Strategy:
        return cls("mics", partition_size, **options)

    def keeps_gathered(self, partition_size: int) -> bool:
        """Whether units stay gathered from forward to backward in ``shard`` (``None``: as ``train`` decides)."""
        if self.kind != "mics":  # DDP gathers nothing; ZeRO-3 is FSDP2's default, which reshards
            return False
        if self.reshard_after_forward is None:
            return partition_size == 1 and not self.cpu_offload
        return not self.reshard_after_forward

    def partition(self, world_size: int, gpus_per_node: int) -> int:
        """The partition size on this cluster; raises ``ValueError`` when it is not node-aligned."""
        p = world_size if self.kind == "zero3" else self.partition_size
        if p is None:
            raise ValueError("Strategy.mics needs a partition_size")
        validate(world_size, gpus_per_node, p)
        return p

    def label(self, world_size: int, gpus_per_node: int) -> str:
        """Short name for tables: ``mics P=64 hier``, ``zero3``, ``ddp``."""
        if self.kind != "mics":
            return self.kind
        p = self.partition(world_size, gpus_per_node)
        spans = p > gpus_per_node > 1
        resharded = " resharded" if p == 1 and self.reshard_after_forward else ""
        return f"mics P={p}" + ((" hier" if self.hierarchical else " flat") if spans else "") + resharded

    def with_sharding(self, kind: Kind, partition_size: int | None = None, hierarchical: bool = False) -> Strategy:
        """The same precision and synchronisation options, sharded another way."""
        return dataclasses.replace(self, kind=kind, partition_size=partition_size, hierarchical=hierarchical)



def options(
    param_dtype: str = "bf16",
    reduce_dtype: str = "fp32",
    replica_reduce_dtype: str | None = None,
    optimizer_over_replicas: bool = False,
    cpu_offload: bool = False,
    error_feedback: bool = True,
) -> Strategy:
    """The settings every candidate of a plan shares, from the names flags and records use.

    The one mapping from user-facing options to the planner's terms: ``plan``, ``simulate``, the
    bench-record reader and ``train --partition-size auto`` all come through here.
    """
    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    if cpu_offload and (optimizer_over_replicas or replica_reduce_dtype):
        raise ValueError("CPU offload cannot be combined with the optimizer over replicas or a replica-hop dtype: "
                         "torchmics runs those replica hops on the gradient shards, which offloading keeps in host memory")
    if replica_reduce_dtype not in (None, *REPLICA_HOP_FORMATS):
        raise ValueError(f"replica_reduce_dtype must be one of {', '.join(REPLICA_HOP_FORMATS)}, got {replica_reduce_dtype!r}")
    replica = wire_bytes(replica_reduce_dtype) if replica_reduce_dtype else None
    residuals = error_feedback and replica_reduce_dtype in QUANTIZED_DTYPES
    return Strategy("mics", param_bytes=DTYPES[param_dtype].itemsize, reduce_bytes=DTYPES[reduce_dtype].itemsize,
                    replica_reduce_bytes=replica, optimizer_over_replicas=optimizer_over_replicas,
                    cpu_offload=cpu_offload, error_feedback_residuals=residuals)
