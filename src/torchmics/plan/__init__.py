"""Planner and simulator: memory model, alpha-beta cost model, partition-size choice, weak scaling.

Everything here is pure arithmetic on sizes (no process groups, no GPUs), so a 1024-GPU plan can be
made and tested on a laptop.
"""

from torchmics.plan.calibrate import calibrate
from torchmics.plan.cluster import PROFILES, ClusterProfile, LinkClass, get_profile
from torchmics.plan.cost import StepCost, replica_all_reduce_time, ring_time, shard_collective_time, step_time
from torchmics.plan.memory import MemoryEstimate, activation_bytes, estimate_memory
from torchmics.plan.model_spec import PAPER_MODELS, ModelSpec
from torchmics.plan.planner import Candidate, evaluate, plan, recommend, render_table
from torchmics.plan.simulate import SimRow, default_sizes, simulate, write_outputs
from torchmics.plan.strategy import Strategy

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
    "get_profile",
    "plan",
    "recommend",
    "render_table",
    "replica_all_reduce_time",
    "ring_time",
    "shard_collective_time",
    "simulate",
    "step_time",
    "write_outputs",
]
