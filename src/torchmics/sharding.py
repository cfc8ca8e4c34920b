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
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from torchmics._fsdp import replica_reduction_pending, skip_single_rank_copies
from torchmics.collectives import HierarchicalAllGather, HierarchicalReduceScatter
from torchmics.materialize import materialize, refuse_meta_buffers
from torchmics.quantized import Quantized, QuantizedReplicaHop
from torchmics.replica import ReplicaAllReduce
from torchmics.topology import Topology, current_device
from torchmics.wrapping import resolve_units

_STATE_ATTR = "_torchmics_state"


@dataclass(frozen=True)
class MixedPrecision:
    """Precision of compute and communication.

    ``param_dtype`` is the dtype parameters are all-gathered and computed in (the sharded master copy
    stays in its original dtype for the optimizer). ``reduce_dtype`` is the dtype gradients are
    reduced in inside the partition group; ``None`` means ``param_dtype``. ``replica_reduce_dtype``,
    when set, is the dtype of the replica hop (precision per hop, e.g. fp32 on NVLink and bf16
    across nodes; see :mod:`torchmics.replica`), or a compressed format
    (:class:`torchmics.Quantized`: int8 or fp8 blocks with error feedback); ``None`` uses the
    partition hop's dtype.
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    replica_reduce_dtype: torch.dtype | Quantized | None = None

    def __post_init__(self) -> None:
        """Refuse a dtype FSDP2 cannot compute or reduce in here, instead of at the first forward."""
        for name in ("param_dtype", "reduce_dtype", "replica_reduce_dtype"):
            value = getattr(self, name)
            if value is None or (name == "replica_reduce_dtype" and isinstance(value, Quantized)):
                continue
            if not isinstance(value, torch.dtype) or not value.is_floating_point or value.itemsize < 2:
                quantized = name == "replica_reduce_dtype"
                hint = " (or torchmics.Quantized(torch.int8 / torch.float8_e4m3fn))" if quantized else ""
                raise ValueError(
                    f"MixedPrecision({name}={value!r}): must be None or a floating-point torch.dtype of 16 bits or "
                    f"more, e.g. torch.bfloat16 or torch.float32{hint}."
                )

    @property
    def replica_hop_dtype(self) -> torch.dtype | None:
        """The dtype gradients cross the replication group in, uncompressed; ``None``: the gradients' own dtype."""
        if isinstance(self.replica_reduce_dtype, Quantized):
            return None
        return self.replica_reduce_dtype or self.reduce_dtype or self.param_dtype

    @property
    def quantized_replica_hop(self) -> Quantized | None:
        return self.replica_reduce_dtype if isinstance(self.replica_reduce_dtype, Quantized) else None

    def to_fsdp(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


@dataclass
class ShardState:
    """What :func:`shard` decided for a model, kept on the model for the functions that take it."""

    topology: Topology
    mixed_precision: MixedPrecision
    units: list[nn.Module]  # the FSDP2 units that communicate, children before parents
    replica: ReplicaAllReduce | None  # set when torchmics, not FSDP2, runs the replica all-reduce
    optimizer_over_replicas: bool
    optimizer: object | None = None  # the ReplicaShardedOptimizer, once built
    in_no_replica_sync: bool = False
    offload: bool = False  # sharded parameters and gradients live in host memory
    reshard_after_forward: bool = True  # False: units stay gathered from forward to backward

    @property
    def quantized_hop(self) -> QuantizedReplicaHop | None:
        """The compressed replica hop and its residuals, once the collective that runs it exists."""
        owner = self.optimizer if self.optimizer_over_replicas else self.replica
        return getattr(owner, "quantized", None)


def shard_state(model: nn.Module) -> ShardState:
    """The state :func:`shard` left on ``model``; a clear error for a model it did not return."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} was not returned by torchmics.shard(); call "
            "`model = torchmics.shard(model, topo)` first and pass that model."
        )
    return state


def topology_of(model: nn.Module) -> Topology:
    """The topology a model was sharded with."""
    return shard_state(model).topology


def shard(
    model: nn.Module,
    topology: Topology,
    *,
    wrap: tuple[type[nn.Module], ...] | None = None,
    mixed_precision: MixedPrecision | None = None,
    hierarchical: bool | Literal["auto"] = "auto",
    reshard_after_forward: bool = True,
    shard_optimizer_across_replicas: bool = False,
    offload: bool = False,
    init_seed: int | None = None,
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

    A model built under :func:`torchmics.meta_init` (parameters on ``meta``) is materialized here:
    each rank allocates only its shards and initializes them from ``init_seed`` (default: rank 0's
    ``torch.initial_seed()``), with the same full weights whatever the topology
    (:mod:`torchmics.materialize`). A model built on a real device keeps its weights.

    ``offload=True`` keeps the sharded parameters, their gradients and so the optimizer states in
    (pinned) CPU memory, and steps the optimizer there: GPU memory then holds only gathered units
    and activations (FSDP2's ``CPUOffloadPolicy``).

    ``reshard_after_forward=False`` keeps each unit gathered from its forward to its backward instead
    of gathering it again there. At a partition size of 1 that is what a plain loop does (autocast's
    cast cache holds the same compute-dtype copy) and saves a cast of the whole model per step; ``train``
    does it there (when it fits). It has FSDP2's caveat: after a forward with gradients that no backward
    follows, the units stay gathered, so ``model.parameters()`` lists the gathered copies and an
    optimizer step leaves them stale: call ``model.reshard()`` (each unit's) before building or stepping
    an optimizer then. A no-grad forward (an eval) reshards the units itself as it ends.
    A one-rank partition group skips FSDP2's extra copies of parameters and gradients
    (:func:`torchmics._fsdp.skip_single_rank_copies`).
    """
    _check_shardable(model, topology)
    on_meta = _is_on_meta(model)
    if on_meta:
        refuse_meta_buffers(model)  # before fully_shard changes it: a refused model stays a plain model
    _check_offload(offload, mixed_precision, shard_optimizer_across_replicas)
    if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int)):
        raise TypeError(f"shard(init_seed={init_seed!r}): the seed is an int (or None for torch.initial_seed())")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"shard(reshard_after_forward={reshard_after_forward!r}): True (the default) or False")
    use_hierarchy = _resolve_hierarchical(hierarchical, topology)
    mixed_precision = mixed_precision or MixedPrecision()
    torchmics_replicates = topology.num_replicas > 1 and (
        shard_optimizer_across_replicas or mixed_precision.replica_reduce_dtype is not None
    )
    # FSDP2 runs the replica hop itself (HSDP, 2-D mesh) unless there is none or torchmics runs it.
    mesh = topology.mesh if topology.num_replicas > 1 and not torchmics_replicates else topology.mesh["shard"]
    policy = mixed_precision.to_fsdp()
    units = resolve_units(model, wrap)
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    offload_policy=offload_policy)
    if _owns_params(model, units):
        units.append(model)  # the root unit communicates what no unit holds (embeddings, head, tied weights)
    if use_hierarchy:
        all_gather, reduce_scatter = HierarchicalAllGather(topology), HierarchicalReduceScatter(topology)
        for unit in units:
            unit.set_custom_all_gather(all_gather)
            unit.set_custom_reduce_scatter(reduce_scatter)
    elif topology.partition_size == 1 and not offload:
        for unit in units:
            skip_single_rank_copies(unit)
    if not reshard_after_forward:
        model.register_forward_hook(_reshard_after_no_grad_forward)
    if on_meta:
        materialize(model, current_device(), _agreed_seed(init_seed), units, offload)
    state = ShardState(topology, mixed_precision, units, None, shard_optimizer_across_replicas, offload=offload,
                       reshard_after_forward=reshard_after_forward)
    if torchmics_replicates and shard_optimizer_across_replicas:
        model.register_forward_pre_hook(lambda *_: _require_replica_optimizer(state))
    elif torchmics_replicates:
        group = topology.mesh.get_group("replicate")
        dtype = mixed_precision.replica_reduce_dtype
        state.replica = ReplicaAllReduce(units, group, dtype, lambda: state.in_no_replica_sync, model)
    setattr(model, _STATE_ATTR, state)
    return model


def _reshard_after_no_grad_forward(model: nn.Module, args: tuple, output: object) -> None:
    """An eval's forward has no backward to reshard its units: reshard them now, so that the next optimizer
    step updates the shards ``model.parameters()`` lists and the next forward gathers the new weights."""
    if not torch.is_grad_enabled():
        _reshard_units(shard_state(model))


def _reshard_units(state: ShardState) -> None:
    for unit in state.units:
        unit.reshard()  # a no-op for a unit already resharded, as every unit is after its backward


def _check_offload(offload: bool, mixed_precision: MixedPrecision | None, optimizer_over_replicas: bool) -> None:
    """torchmics' own replica hop works on the gradients where FSDP2 leaves them: on the CPU under offload."""
    own_hop = optimizer_over_replicas or (mixed_precision is not None and mixed_precision.replica_reduce_dtype)
    if offload and own_hop:
        raise ValueError(
            "offload=True cannot be combined with shard_optimizer_across_replicas=True or a replica_reduce_dtype: "
            "torchmics runs those replica hops on the gradient shards, which offloading keeps in host memory. "
            "Offload alone keeps FSDP2's replica all-reduce (on the GPU) and already moves the optimizer states "
            "off the GPU."
        )


def _is_on_meta(model: nn.Module) -> bool:
    """Whether every parameter is on ``meta``; a mix of both cannot be materialized without losing weights."""
    meta = [p.is_meta for p in model.parameters()]
    if any(meta) and not all(meta):
        names = [name for name, p in model.named_parameters() if p.is_meta]
        raise ValueError(
            f"{len(names)} of {len(meta)} parameters are on the meta device ({', '.join(names[:3])}, ...) and the "
            "rest are not; build the whole model under torchmics.meta_init(), or the whole model on a real device."
        )
    return bool(meta) and all(meta)


def _agreed_seed(seed: int | None) -> int:
    """``seed``, or rank 0's ``torch.initial_seed()``: every rank must initialize from the same one."""
    local = torch.initial_seed() if seed is None else seed
    value = torch.tensor([local % 2**63], dtype=torch.int64, device=current_device())
    dist.broadcast(value, src=0)
    return int(value.item())


def _require_replica_optimizer(state: ShardState) -> None:
    """Without it nothing would ever reduce gradients across replicas: fail before training silently diverges."""
    if state.optimizer is None and torch.is_grad_enabled():
        raise RuntimeError(
            "this model was sharded with shard_optimizer_across_replicas=True, so its replica hop is run by "
            "torchmics.ReplicaShardedOptimizer; build one (ReplicaShardedOptimizer(model, torch.optim.AdamW, "
            "lr=...)) before training, or shard without the option to use a plain optimizer."
        )


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
    if not isinstance(topology, Topology):
        raise TypeError(f"shard(model, topology): topology is a torchmics.Topology, from "
                        f"torchmics.init_mesh(partition_size=...), got {topology!r}")
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
    and the replica hop is skipped. The first backward *outside* the context runs it once on the
    accumulated shard (an all-reduce; with :class:`torchmics.ReplicaShardedOptimizer` a
    reduce-scatter), so a step with ``A`` micro-batches costs ``A`` cheap partition-group
    reduce-scatters and one replica hop instead of ``A`` of each. The last micro-step must run
    outside the context: if every backward of a step is deferred, only the replica-sharded
    optimizer still reduces (at ``step()``).
    """
    state = shard_state(model)
    if state.in_no_replica_sync:
        raise RuntimeError("no_replica_sync(model) is already active for this model; do not nest it.")
    state.in_no_replica_sync = True  # torchmics' replica hop reads this flag
    model.set_requires_all_reduce(False)  # FSDP2's (HSDP) replica all-reduce is held back
    try:
        yield
    finally:
        model.set_requires_all_reduce(True)
        state.in_no_replica_sync = False


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the global gradient norm of a sharded model; returns the total norm (before clipping).

    Gradients are sharded DTensors, so the norm of each shard is reduced across the partition group
    (replicas hold identical shards after the replica all-reduce). Call it after the last backward
    of the step, outside :func:`no_replica_sync`.
    """
    state = shard_state(model)
    if not max_norm > 0:  # a negative one would flip every gradient's sign
        raise ValueError(f"clip_grad_norm_(max_norm={max_norm!r}): must be > 0 (math.inf turns clipping off)")
    if state.in_no_replica_sync:
        raise RuntimeError(
            "clip_grad_norm_ was called inside no_replica_sync(model): the gradients there are not yet reduced "
            "across replicas (or not yet written at all), so their norm is wrong. Run the last micro-step's "
            "backward outside no_replica_sync, then clip."
        )
    if state.optimizer is not None:  # gradients are only complete in the optimizer's slices
        return state.optimizer.clip_grad_norm_(max_norm, norm_type)
    if not state.reshard_after_forward:  # a forward no backward followed leaves gathered copies in parameters()
        _reshard_units(state)
    with_grads = [p for p in model.parameters() if p.grad is not None]
    _refuse_unreduced(state, bool(with_grads))
    grads = [p.grad for p in with_grads]
    if state.offload:
        total = _offloaded_norm(grads, norm_type, state.topology)
    else:
        total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, total)
    return total


def _refuse_unreduced(state: ShardState, any_gradient: bool) -> None:
    """Raise if every backward since the last step deferred the replica hop, whichever runs it.

    torchmics' hop leaves partition-reduced gradients in ``.grad`` (the replicas would step apart);
    FSDP2's (HSDP) holds them back entirely (the step would apply none). A unit whose gradients came
    only from deferred micro-steps while others were reduced is FSDP2's own limitation, not refused:
    FSDP2 keeps those gradients for the unit's next reduction (torchmics' hop reduces them at once).
    """
    if state.replica is not None:
        unreduced = state.replica.hop.unreduced_units()
        consequence = (f"the gradients of {unreduced} units hold partition-reduced values and the replicas would "
                       "step apart")
    else:
        unreduced = 0 if any_gradient else sum(replica_reduction_pending(unit) for unit in state.units)
        consequence = "FSDP2's replica all-reduce holds every gradient back and the step would apply none"
    if unreduced:
        raise RuntimeError(
            f"clip_grad_norm_: gradients were never reduced across replicas: every backward since the last step ran "
            f"inside no_replica_sync(model), so {consequence}. Run the last micro-step's backward outside "
            "no_replica_sync, then clip."
        )


def _offloaded_norm(grads: list[DTensor], norm_type: float, topology: Topology) -> torch.Tensor:
    """The total norm of gradient shards kept in host memory, reduced over the partition group on the device.

    DTensor would reduce the CPU tensors with the mesh's backend, which NCCL cannot; so each rank
    reduces its own shards on the CPU and only one number per rank crosses the partition group.
    """
    if not grads:
        return torch.zeros(())
    shards = [g.to_local() for g in grads if g.to_local().numel()]
    infinite = math.isinf(norm_type)
    if not shards:
        local = torch.zeros((), dtype=torch.float32)
    elif infinite:
        local = torch.stack([t.abs().max().float() for t in shards]).max()
    else:
        local = sum(t.float().norm(norm_type) ** norm_type for t in shards)
    reduced = local.to(current_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM,
                    group=topology.mesh.get_group("shard"))
    return (reduced if infinite else reduced ** (1.0 / norm_type)).to(grads[0].to_local().device)
