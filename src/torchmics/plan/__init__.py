"""Planner and simulator: memory model, alpha-beta cost model, partition-size choice, weak scaling.

Everything here is pure arithmetic on sizes (no process groups, no GPUs), so a 1024-GPU plan can be
made and tested on a laptop.
"""

from torchmics.plan.calibrate import calibrate, fit_link
from torchmics.plan.cluster import (
    PROFILES,
    ClusterProfile,
    LinkClass,
    get_profile,
    with_gpus_per_node,
)
from torchmics.plan.cost import (
    StepCost,
    optimizer_time,
    pipelined,
    replica_all_reduce_time,
    ring_time,
    shard_collective_time,
    step_time,
)
from torchmics.plan.memory import MemoryEstimate, activation_bytes, estimate_memory
from torchmics.plan.model_spec import PAPER_MODELS, ModelSpec
from torchmics.plan.planner import Candidate, evaluate, plan, recommend, render_table
from torchmics.plan.records import (
    predict_record,
    record_strategy,
    training_records,
)
from torchmics.plan.simulate import SimRow, default_sizes, simulate, write_outputs
from torchmics.plan.strategy import Strategy
from torchmics.tables import read_jsonl  # results files, read as everything else reads JSONL

__all__ = [
    "PAPER_MODELS",
    "PROFILES",
    "Candidate",
    "ClusterProfile",
    "LinkClass",
    "MemoryEstimate",
    "ModelSpec",
    "SimRow",
    "StepCost",
    "Strategy",
    "activation_bytes",
    "calibrate",
    "default_sizes",
    "estimate_memory",
    "evaluate",
    "fit_link",
    "get_profile",
    "optimizer_time",
    "pipelined",
    "plan",
    "predict_record",
    "read_jsonl",
    "recommend",
    "record_strategy",
    "render_table",
    "replica_all_reduce_time",
    "ring_time",
    "shard_collective_time",
    "simulate",
    "step_time",
    "training_records",
    "with_gpus_per_node",
    "write_outputs",
]
