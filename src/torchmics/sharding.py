"""`shard()`: apply MiCS to a model with FSDP2 as the runtime, plus two-hop sync and gradient clipping.

A MiCS job is FSDP2 on a 2-D ``("replicate", "shard")`` mesh (HSDP) whose shard dimension is the
partition group, with three additions: the partition size comes from the topology (scale-aware),
collectives run hierarchically when a partition group spans nodes, and gradient accumulation defers
the replication all-reduce to the last micro-step (:func:`no_replica_sync`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from torchmics.collectives import HierarchicalAllGather, HierarchicalReduceScatter
from torchmics.replica import ReplicaReduction
from torchmics.topology import Topology
from torchmics.wrapping import resolve_units

_TOPOLOGY_ATTR = "_torchmics_topology"
_NO_SYNC_ATTR = "_torchmics_in_no_replica_sync"
_REPLICA_ATTR = "_torchmics_replica_reduction"
_OPTIMIZER_SHARDING_ATTR = "_torchmics_optimizer_sharding"
_MIXED_PRECISION_ATTR = "_torchmics_mixed_precision"
_ATTACHED_OPTIMIZER_ATTR = "_torchmics_optimizer"


@dataclass(frozen=True)
class MixedPrecision:
    """Precision of compute and communication.

    ``param_dtype`` is the dtype parameters are all-gathered and computed in (the sharded master copy
    stays in its original dtype for the optimizer). ``reduce_dtype`` is the dtype gradients are
    reduced in inside the partition group; ``None`` means ``param_dtype``. ``replica_reduce_dtype``,
    when set, is the dtype of the replication-group all-reduce (precision per hop, e.g. fp32 on
    NVLink and bf16 across nodes; see :mod:`torchmics.replica`); ``None`` uses ``reduce_dtype``.
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    replica_reduce_dtype: torch.dtype | None = None

    def to_fsdp(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


def topology_of(model: nn.Module) -> Topology:
    """The topology a model was sharded with; a clear error for a model :func:`shard` did not return."""
    topo = getattr(model, _TOPOLOGY_ATTR, None)
    if topo is None:
        raise ValueError(
            f"{type(model).__name__} was not returned by torchmics.shard(); call "
            "`model = torchmics.shard(model, topo)` first and pass that model."
        )
    return topo


def shard(
    model: nn.Module,
    topology: Topology,
    *,
    wrap: tuple[type[nn.Module], ...] | None = None,
    mixed_precision: MixedPrecision | None = None,
    hierarchical: bool | Literal["auto"] = "auto",
    reshard_after_forward: bool = True,
    shard_optimizer_across_replicas: bool = False,
) -> nn.Module:
    """Shard ``model`` in place over ``topology``'s partition groups and return it.

    Each *unit* (an instance of a class in ``wrap``; ``None`` picks them automatically, see
    :func:`torchmics.wrapping.resolve_units`) gathers its parameters just before it runs and frees
    them after, so peak memory holds one or two gathered units rather than the whole model. The root
    module becomes a unit too, holding whatever the units do not (embeddings, heads, tied weights).

    ``hierarchical="auto"`` uses two-stage collectives exactly when the partition group spans nodes
    with several GPUs each; ``True`` demands it (an error if the topology has no hierarchy), ``False``
    forces flat rings (for comparison).

    ``shard_optimizer_across_replicas=True`` leaves the replica hop to
    :class:`torchmics.ReplicaShardedOptimizer`, which keeps optimizer state for ``1/R`` of each
    shard (see :mod:`torchmics.optim`); build the optimizer with it, not on ``model.parameters()``.
    """
    _check_shardable(model, topology)
    use_hierarchy = _resolve_hierarchical(hierarchical, topology)
    mixed_precision = mixed_precision or MixedPrecision()
    replica = None if shard_optimizer_across_replicas else _replica_reduction(topology, mixed_precision)
    by_optimizer = shard_optimizer_across_replicas and topology.num_replicas > 1
    # FSDP2 runs the replica hop itself (HSDP, 2-D mesh) unless torchmics does (hook) or there is none.
    mesh = topology.mesh if topology.num_replicas > 1 and replica is None and not by_optimizer else topology.mesh["shard"]
    policy = mixed_precision.to_fsdp()
    units = resolve_units(model, wrap)
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if _owns_params(model, units):
        units.append(model)  # the root unit communicates what no unit holds (embeddings, head, tied weights)
    if use_hierarchy:
        all_gather, reduce_scatter = HierarchicalAllGather(topology), HierarchicalReduceScatter(topology)
        for unit in units:
            unit.set_custom_all_gather(all_gather)
            unit.set_custom_reduce_scatter(reduce_scatter)
    if replica is not None:
        for index, unit in enumerate(units):
            unit.set_all_reduce_hook(replica.hook_for(index))
    setattr(model, _TOPOLOGY_ATTR, topology)
    setattr(model, _REPLICA_ATTR, replica)
    setattr(model, _OPTIMIZER_SHARDING_ATTR, shard_optimizer_across_replicas)
    setattr(model, _MIXED_PRECISION_ATTR, mixed_precision)
    return model


def uses_replica_sharded_optimizer(model: nn.Module) -> bool:
    return getattr(model, _OPTIMIZER_SHARDING_ATTR, False)


def mixed_precision_of(model: nn.Module) -> MixedPrecision:
    return getattr(model, _MIXED_PRECISION_ATTR, MixedPrecision())


def attach_optimizer(model: nn.Module, optimizer: object) -> None:
    """Remember the replica-sharded optimizer: clipping and full state dicts must go through it."""
    setattr(model, _ATTACHED_OPTIMIZER_ATTR, optimizer)


def attached_optimizer(model: nn.Module):
    return getattr(model, _ATTACHED_OPTIMIZER_ATTR, None)


def _replica_reduction(topology: Topology, mixed_precision: MixedPrecision) -> ReplicaReduction | None:
    if mixed_precision.replica_reduce_dtype is None or topology.num_replicas == 1:
        return None
    return ReplicaReduction(topology.mesh.get_group("replicate"), mixed_precision.replica_reduce_dtype)


def _owns_params(model: nn.Module, units: list[nn.Module]) -> bool:
    """Whether any parameter of ``model`` lies outside every unit (so the root unit has work)."""
    in_units = {id(p) for unit in units for p in unit.parameters()}
    return any(id(p) not in in_units for p in model.parameters())


def _check_shardable(model: nn.Module, topology: Topology) -> None:
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already sharded (it contains FSDP modules); shard() takes the "
            "plain model once. Build a fresh model to shard it with another topology."
        )
    if topology.mesh is None:
        raise ValueError(
            "this Topology has no process groups (it came from plan_topology()); use "
            "torchmics.init_mesh(partition_size=...) to create them."
        )


def _resolve_hierarchical(hierarchical: bool | Literal["auto"], topology: Topology) -> bool:
    if hierarchical == "auto":
        return topology.hierarchical
    if hierarchical is True and not topology.hierarchical:
        raise ValueError(
            "hierarchical=True needs a partition group spanning nodes with several GPUs each "
            f"(partition_size > gpus_per_node > 1), but the topology is: {topology.describe()}"
        )
    if hierarchical not in (True, False):
        raise ValueError(f"hierarchical must be 'auto', True or False, got {hierarchical!r}")
    return hierarchical


@contextlib.contextmanager
def no_replica_sync(model: nn.Module) -> Iterator[None]:
    """Two-hop gradient sync: backwards inside only reduce-scatter within the partition group.

    Gradients stay sharded (each micro-step's reduce-scatter output is accumulated into the shard),
    and the replication-group all-reduce is skipped. The first backward *outside* the context
    all-reduces the accumulated shard once, so a step with ``A`` micro-batches costs ``A`` cheap
    partition-group reduce-scatters and one replica all-reduce instead of ``A`` of each.
    """
    topology_of(model)
    if getattr(model, _NO_SYNC_ATTR, False):
        raise RuntimeError("no_replica_sync(model) is already active for this model; do not nest it.")
    replica: ReplicaReduction | None = getattr(model, _REPLICA_ATTR)
    setattr(model, _NO_SYNC_ATTR, True)
    if replica is None:
        model.set_requires_all_reduce(False)
    else:
        replica.deferring = True
    try:
        yield
    finally:
        if replica is None:
            model.set_requires_all_reduce(True)
        else:
            replica.deferring = False
        setattr(model, _NO_SYNC_ATTR, False)


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the global gradient norm of a sharded model; returns the total norm (before clipping).

    Gradients are sharded DTensors, so the norm of each shard is reduced across the partition group
    (replicas hold identical shards after the replica all-reduce). Call it after the last backward
    of the step, outside :func:`no_replica_sync`.
    """
    topology_of(model)
    optimizer = attached_optimizer(model)
    if optimizer is not None:
        return _clip_replica_sharded(optimizer, max_norm, norm_type)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, total)
    return total


def _clip_replica_sharded(optimizer, max_norm: float, norm_type: float) -> torch.Tensor:
    """Every gradient element lives in exactly one rank's owned slice, so one world reduction is exact."""
    optimizer.reduce_gradients()
    grads = [s.grad for s in optimizer.slices if s.grad is not None and s.grad.numel()]
    local = torch.nn.utils.get_total_norm(grads, norm_type=norm_type) if grads else torch.zeros(())
    local = local.to(optimizer.slices[0].device)
    if math.isinf(norm_type):
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        total = local
    else:
        local = local.pow(norm_type)
        dist.all_reduce(local)
        total = local.pow(1.0 / norm_type)
    torch.nn.utils.clip_grads_with_norm_(optimizer.slices, max_norm, total)
    return total
