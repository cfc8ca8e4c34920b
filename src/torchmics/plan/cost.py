"""Alpha-beta cost model of one training step under DDP, ZeRO-3 or MiCS.

Collectives are NCCL rings. A ring over ``p`` ranks takes ``p-1`` steps; each step pays the latency
``alpha`` of its slowest hop and moves ``1/p`` of the message, so
``t = (p-1)*alpha + (p-1)/p * bytes / beta`` (twice that for an all-reduce). Charging every step the
slowest hop's latency is an upper bound: NCCL pipelines chunks round the ring, so a topology-aware
ring pays the network's latency only on its node-crossing hops. Three placements:

* inside a node: NVLink, per-GPU bandwidth;
* a flat ring spanning nodes: NCCL enters and leaves every node once per channel, so each node's
  network carries ``(p-1)/p`` of the message at the node's full bandwidth, whatever ``p`` is. What
  grows with ``p`` is the latency term: ``p-1`` network-latency steps, each moving only ``bytes/p``;
* hierarchical (MiCS): an inter-node ring among the ``m = p/k`` nodes, run by all ``k`` GPUs of a node
  at once (each on 1/k of the node's bandwidth), then an intra-node ring. Network volume per node
  drops only from ``(p-1)/p`` to ``(m-1)/m`` of the unit, but there are ``m-1`` network steps, not ``p-1``.

Replication all-reduces (MiCS, DDP) run ``min(P, k)`` groups per node at once, sharing its network,
one unit at a time as each unit's gradients are ready (FSDP2 HSDP per unit, DDP per bucket).

Overlap follows FSDP2's prefetching, unit by unit (:func:`pipelined`): the blocks' forward all-gathers
overlap forward compute, and their backward all-gathers, reduce-scatters and replica all-reduces
overlap backward compute (plus the recomputed forward under activation checkpointing). The root unit
(embeddings and head) cannot hide: its all-gather comes before any compute, its reduction after all
of it. The optimizer step, memory-bound at the GPU's HBM bandwidth, comes last. Contention between
concurrent streams is ignored (compute slowed by NCCL kernels, collectives of two process groups
sharing a link).

Checked against every run in ``benchmarks/results/`` (``tests/test_plan.py``, calibrated profiles):
within 15% of the measured tokens/s per GPU on NVLink and on emulated nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchmics.plan.cluster import ClusterProfile, LinkClass
from torchmics.plan.memory import MASTER_BYTES
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.strategy import Strategy


def ring_time(ranks: int, nbytes: float, link: LinkClass, *, passes: int = 1, sharers: int = 1) -> float:
    """Seconds for a ring all-gather / reduce-scatter (``passes=1``) or all-reduce (``passes=2``).

    ``nbytes`` is the full (gathered) size; ``sharers`` rings use the same link at the same time.
    """
    if ranks <= 1:
        return 0.0
    return passes * ((ranks - 1) * link.alpha + (ranks - 1) / ranks * nbytes * sharers / link.beta)


def shard_collective_time(nbytes: float, partition: int, cluster: ClusterProfile, hierarchical: bool) -> float:
    """One all-gather (or its mirror, a reduce-scatter) of a unit of ``nbytes`` in a partition group."""
    k = cluster.gpus_per_node
    if partition <= k:
        return ring_time(partition, nbytes, cluster.intra)
    if not hierarchical or k == 1:
        return ring_time(partition, nbytes, cluster.inter)
    m = partition // k
    inter = ring_time(m, nbytes * m / partition, cluster.inter, sharers=k)
    return inter + ring_time(k, nbytes, cluster.intra)


def replica_all_reduce_time(nbytes: float, world: int, partition: int, cluster: ClusterProfile, passes: int = 2) -> float:
    """All-reduce of each GPU's ``nbytes`` gradient shard across the ``world / partition`` replicas.

    ``passes=1`` is half of it: the reduce-scatter, or the all-gather, of the replica-sharded optimizer.
    """
    replicas, k = world // partition, cluster.gpus_per_node
    if world <= k:
        return ring_time(replicas, nbytes, cluster.intra, passes=passes)
    return ring_time(replicas, nbytes, cluster.inter, passes=passes, sharers=min(partition, k))


# Fused AdamW on fp32 states: reads parameter, gradient and two moments, writes parameter and moments.
ADAMW_BYTES_PER_PARAM = 7 * 4


# Assumptions for CPU offload: one rank's share of the host's memory bandwidth for AdamW on the CPU,
# and PCIe 4/5 x16 bandwidth for the shard copies (FSDP2 copies a unit's fp32 shard to the GPU at
# each all-gather and the reduced gradient back to the host).
CPU_ADAMW_BYTES_PER_S = 10e9
PCIE_BYTES_PER_S = 25e9


def optimizer_time(model: ModelSpec, strategy: Strategy, world: int, cluster: ClusterProfile) -> float:
    """The optimizer step over this GPU's shard: memory-bound, and nothing is left to hide it behind."""
    p = strategy.partition(world, cluster.gpus_per_node)
    shards = world if strategy.optimizer_over_replicas else p
    bandwidth = CPU_ADAMW_BYTES_PER_S if strategy.cpu_offload else cluster.hbm_tbps * 1e12
    return ADAMW_BYTES_PER_PARAM * model.num_params / shards / bandwidth


def offload_copy_time(model: ModelSpec, strategy: Strategy, world: int, cluster: ClusterProfile, accum: int) -> float:
    """Host-device copies of one step under CPU offload: shards up at every gather (forward, backward), gradients down."""
    if not strategy.cpu_offload:
        return 0.0
    shard_bytes = MASTER_BYTES * model.num_params / strategy.partition(world, cluster.gpus_per_node)
    return accum * 3 * shard_bytes / PCIE_BYTES_PER_S


@dataclass(frozen=True)
class StepCost:
    """Seconds per optimizer step, by component (communication totals before overlap)."""

    compute: float
    optimizer: float
    all_gather: float
    reduce_scatter: float
    all_reduce: float
    total: float
    tokens_per_s_per_gpu: float
    mfu: float

    @property
    def exposed_comm(self) -> float:
        """Communication the step waits for: everything above compute and the optimizer step."""
        return self.total - self.compute - self.optimizer


def pipelined(units: int, comm: float, compute: float) -> float:
    """``units`` units whose collectives (one stream) overlap the compute of their neighbours.

    A two-stage pipeline: the slower stage sets the pace, and one unit of the faster stage sticks out
    at an end (the first gather before any compute, or the last compute before the last reduction).
    """
    return units * max(comm, compute) + min(comm, compute)


def step_time(
    model: ModelSpec,
    cluster: ClusterProfile,
    nodes: int,
    strategy: Strategy,
    micro_batch: int,
    accum: int = 1,
    activation_checkpointing: bool = False,
) -> StepCost:
    """Predicted time of one optimizer step of ``accum`` micro-batches of ``micro_batch`` sequences.

    Per micro-step, FSDP2's units are the root (embeddings and head: gathered once, before forward, and
    reduced last, after backward, with nothing left to hide either behind) and ``n_layer`` blocks (each
    gathered in forward and again in backward, then reduced and, with a replica all-reduce, synced).
    """
    world, k = nodes * cluster.gpus_per_node, cluster.gpus_per_node
    p = strategy.partition(world, k)
    tokens = micro_batch * model.seq_len
    forward = tokens * model.flops_per_token / 3 / (cluster.peak_flops * cluster.compute_mfu)
    backward = 2 * forward + (forward if activation_checkpointing else 0.0)
    layers = model.n_layer

    replica_passes = 1 if strategy.optimizer_over_replicas else 2  # a reduce-scatter, or an all-reduce

    def collectives(params: int) -> tuple[float, float, float]:
        """(all-gather, reduce-scatter, replica hop in backward) seconds of one unit of ``params``."""
        gather = shard_collective_time(params * strategy.param_bytes, p, cluster, strategy.hierarchical)
        scatter = shard_collective_time(params * strategy.reduce_bytes, p, cluster, strategy.hierarchical)
        replica = replica_all_reduce_time(params * strategy.replica_hop_bytes / p, world, p, cluster, replica_passes)
        return gather, scatter, replica

    ag, rs, ar = collectives(model.layer_params)
    ag_root, rs_root, ar_root = collectives(model.embedding_params)
    # The replica-sharded optimizer all-gathers the updated parameters after its step: nothing hides it.
    regather = replica_all_reduce_time(model.num_params * strategy.param_bytes / p, world, p, cluster, 1) \
        if strategy.optimizer_over_replicas else 0.0

    def micro_step(synced: bool) -> float:
        forward_time = ag_root + pipelined(layers, ag, forward / layers)
        backward_comm = ag + rs + (ar if synced else 0.0)
        backward_time = pipelined(layers, backward_comm, backward / layers)
        return forward_time + backward_time + rs_root + (ar_root if synced else 0.0)

    synced_steps = 1 if strategy.two_hop else accum
    optimizer = optimizer_time(model, strategy, world, cluster)
    copies = offload_copy_time(model, strategy, world, cluster, accum)  # assumed not hidden: a bound, not a guess
    optimizer += copies
    total = (accum - synced_steps) * micro_step(False) + synced_steps * micro_step(True) + optimizer + regather
    tps = tokens * accum / total
    return StepCost(
        compute=accum * (forward + backward),
        optimizer=optimizer,
        all_gather=accum * (ag_root + 2 * layers * ag),
        reduce_scatter=accum * (rs_root + layers * rs),
        all_reduce=synced_steps * (ar_root + layers * ar) + regather,
        total=total,
        tokens_per_s_per_gpu=tps,
        mfu=tps * model.flops_per_token / cluster.peak_flops,
    )
