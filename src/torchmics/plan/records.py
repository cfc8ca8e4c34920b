"""``torchmics bench`` results as planner inputs: which model, strategy and cluster shape each line ran.

Calibration fits a profile to these lines and :mod:`torchmics.plan.validate` predicts them back; both
must read a line the same way, so the mapping from a benchmarked system to a :class:`Strategy` lives
here, once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchmics.plan.cluster import ClusterProfile, with_gpus_per_node
from torchmics.plan.cost import StepCost, step_time
from torchmics.plan.memory import MemoryEstimate, estimate_memory
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.strategy import Strategy, options

Record = dict[str, Any]


def training_records(lines: list[Record]) -> list[Record]:
    """The training runs that finished (failed runs and collective lines measure nothing to predict)."""
    return [r for r in lines if r.get("kind") != "collective" and r.get("status", "ok") == "ok"]


def record_model(record: Record) -> ModelSpec:
    """The benchmarked model at the sequence length it ran with."""
    return dataclasses.replace(ModelSpec.from_name(record["model"]), seq_len=record["seq_len"])


def record_strategy(record: Record) -> Strategy:
    """What a benchmarked system does, in the planner's terms (see ``torchmics.bench.systems``).

    The bench's DDP all-reduces every micro-step (no ``no_sync``); FSDP2 HSDP gathers with NCCL's flat
    ring; torchmics is MiCS, hierarchical where its partition spans nodes, two-hop unless told not to.
    Units were resharded after forward unless the record says otherwise (records before the field
    were all measured resharding).
    """
    shared = options(record["param_dtype"], record["reduce_dtype"], record.get("replica_reduce_dtype"))
    precision = {"param_bytes": shared.param_bytes, "reduce_bytes": shared.reduce_bytes,
                 "replica_reduce_bytes": shared.replica_reduce_bytes,
                 "reshard_after_forward": record.get("reshard_after_forward", True)}
    system, p = record["system"], record["partition_size"]
    if system == "ddp":
        return Strategy.ddp(two_hop=False, **precision)
    if system == "fsdp2-full":
        return Strategy.zero3(**precision)
    if system in ("torchmics", "torchmics-flat", "torchmics-no-two-hop", "fsdp2-hsdp"):
        hierarchical = system in ("torchmics", "torchmics-no-two-hop")
        return Strategy.mics(p, hierarchical=hierarchical, two_hop=system != "torchmics-no-two-hop", **precision)
    if system in ("torchmics-optimizer-over-replicas", "torchmics-replica-optimizer"):  # the second: its earlier name
        return Strategy.mics(p, optimizer_over_replicas=True, **precision)
    raise ValueError(f"no planner strategy for benchmarked system {system!r}")


def record_cluster(profile: ClusterProfile, record: Record) -> ClusterProfile:
    """``profile`` regrouped into the record's nodes (see :func:`with_gpus_per_node`)."""
    return with_gpus_per_node(profile, record["gpus_per_node"])


def predict_record(profile: ClusterProfile, record: Record) -> tuple[StepCost, MemoryEstimate]:
    """The cost and memory models' view of one benchmarked run on ``profile``.

    Memory leaves out the fixed overhead: the bench reports ``torch.cuda.max_memory_allocated``, which
    counts tensors only (no CUDA context, no NCCL buffers).
    """
    model, strategy, cluster = record_model(record), record_strategy(record), record_cluster(profile, record)
    world, k = record["nodes"] * record["gpus_per_node"], record["gpus_per_node"]
    micro_batch, accum = record["micro_batch"], record["accum"]
    cost = step_time(model, cluster, record["nodes"], strategy, micro_batch, accum)
    memory = estimate_memory(model, strategy, world, k, micro_batch, overhead_bytes=0.0, accum=accum)
    return cost, memory
