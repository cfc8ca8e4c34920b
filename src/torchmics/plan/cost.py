"""Alpha-beta cost model of one training step under DDP, ZeRO-3 or MiCS.

Collectives are NCCL rings. A ring over ``p`` ranks takes ``p-1`` steps; each step pays the latency
``alpha`` of its slowest hop and moves ``1/p`` of the message, so
``t = (p-1)*alpha + (p-1)/p * bytes / beta`` (twice that for an all-reduce). Three placements:

* inside a node: NVLink, per-GPU bandwidth;
* a flat ring spanning nodes: NCCL enters and leaves every node once per channel, so each node's
  network carries ``(p-1)/p`` of the message at the node's full bandwidth, whatever ``p`` is. What
  grows with ``p`` is the latency term: ``p-1`` network-latency steps, each moving only ``bytes/p``;
* hierarchical (MiCS): an inter-node ring among the ``m = p/k`` nodes, run by all ``k`` GPUs of a node
  at once (each on 1/k of the node's bandwidth), then an intra-node ring. Network volume per node
  drops only from ``(p-1)/p`` to ``(m-1)/m`` of the unit, but there are ``m-1`` network steps, not ``p-1``.

Replication all-reduces (MiCS, DDP) run ``min(P, k)`` groups per node at once, sharing its network.

Overlap follows FSDP2's prefetching: the forward all-gathers hide behind forward compute, and the
backward all-gathers, reduce-scatters and replica all-reduce behind backward compute (plus the
recomputed forward under activation checkpointing); each phase costs ``max(compute, comm)``. What
cannot be hidden is the first unit's all-gather and the last unit's reduction. The model ignores the
optimizer step (memory-bound, ~1% of a step) and contention between concurrent streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchmics.plan.cluster import ClusterProfile, LinkClass
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


def replica_all_reduce_time(nbytes: float, world: int, partition: int, cluster: ClusterProfile) -> float:
    """All-reduce of each GPU's ``nbytes`` gradient shard across the ``world / partition`` replicas."""
    replicas, k = world // partition, cluster.gpus_per_node
    if world <= k:
        return ring_time(replicas, nbytes, cluster.intra, passes=2)
    return ring_time(replicas, nbytes, cluster.inter, passes=2, sharers=min(partition, k))


@dataclass(frozen=True)
class StepCost:
    """Seconds per optimizer step, by component (communication totals before overlap)."""

    compute: float
    all_gather: float
    reduce_scatter: float
    all_reduce: float
    total: float
    tokens_per_s_per_gpu: float
    mfu: float

    @property
    def exposed_comm(self) -> float:
        """Communication the step waits for: everything above pure compute."""
        return self.total - self.compute


def step_time(
    model: ModelSpec,
    cluster: ClusterProfile,
    nodes: int,
    strategy: Strategy,
    micro_batch: int,
    accum: int = 1,
    activation_checkpointing: bool = False,
) -> StepCost:
    """Predicted time of one optimizer step of ``accum`` micro-batches of ``micro_batch`` sequences."""
    world = nodes * cluster.gpus_per_node
    p = strategy.partition(world, cluster.gpus_per_node)
    tokens = micro_batch * model.seq_len
    forward = tokens * model.flops_per_token / 3 / (cluster.peak_flops * cluster.compute_mfu)
    backward = 2 * forward + (forward if activation_checkpointing else 0.0)

    ag = rs = 0.0  # per micro-step, all units
    if strategy.kind != "ddp":
        unit = model.layer_params
        ag = model.n_layer * shard_collective_time(unit * strategy.param_bytes, p, cluster, strategy.hierarchical)
        rs = model.n_layer * shard_collective_time(unit * strategy.reduce_bytes, p, cluster, strategy.hierarchical)
    ar = replica_all_reduce_time(model.num_params * strategy.reduce_bytes / p, world, p, cluster)

    def micro_step(all_reduce: float) -> float:
        backward_comm = ag + rs + all_reduce
        exposed = backward_comm / model.n_layer  # one unit's worth: the first gather, the last reduction
        return max(forward, ag) + max(backward, backward_comm) + exposed

    ar_micro_steps = 1 if strategy.two_hop else accum
    total = (accum - ar_micro_steps) * micro_step(0.0) + ar_micro_steps * micro_step(ar)
    tps = tokens * accum / total
    return StepCost(
        compute=accum * (forward + backward),
        all_gather=accum * 2 * ag,
        reduce_scatter=accum * rs,
        all_reduce=ar_micro_steps * ar,
        total=total,
        tokens_per_s_per_gpu=tps,
        mfu=tps * model.flops_per_token / cluster.peak_flops,
    )
