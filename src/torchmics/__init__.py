"""torchmics: MiCS (Minimize Communication Scale) sharded data parallelism for PyTorch, on FSDP2."""

from torchmics.checkpoint import full_state_dict
from torchmics.sharding import MixedPrecision, clip_grad_norm_, no_replica_sync, shard
from torchmics.topology import Topology, init_mesh, plan_topology

__all__ = [
    "MixedPrecision",
    "Topology",
    "clip_grad_norm_",
    "full_state_dict",
    "init_mesh",
    "no_replica_sync",
    "plan_topology",
    "shard",
]
