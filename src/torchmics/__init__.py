"""torchmics: MiCS (Minimize Communication Scale) sharded data parallelism for PyTorch, on FSDP2."""

from torchmics.checkpoint import (
    DamagedCheckpointError,
    checkpoint_path,
    full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from torchmics.export import export_checkpoint, export_model
from torchmics.fault_tolerance import FaultTolerantReplicas  # torchft is imported only when one is built
from torchmics.materialize import init_weights, meta_init
from torchmics.optim import ReplicaShardedOptimizer
from torchmics.pretrained import load_pretrained
from torchmics.quantized import Quantized
from torchmics.sharding import MixedPrecision, clip_grad_norm_, no_replica_sync, shard
from torchmics.topology import Topology, init_mesh, plan_topology

__all__ = [
    "DamagedCheckpointError",
    "FaultTolerantReplicas",
    "MixedPrecision",
    "Quantized",
    "ReplicaShardedOptimizer",
    "Topology",
    "checkpoint_path",
    "clip_grad_norm_",
    "export_checkpoint",
    "export_model",
    "full_state_dict",
    "latest_checkpoint",
    "load_pretrained",
    "load_checkpoint",
    "init_mesh",
    "init_weights",
    "meta_init",
    "no_replica_sync",
    "plan_topology",
    "save_checkpoint",
    "shard",
    "verify_checkpoint",
]
