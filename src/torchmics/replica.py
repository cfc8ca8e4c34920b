"""The replication hop, run by torchmics so that its precision can differ from the partition hop's.

FSDP2's HSDP reduces gradients in one dtype on both hops: reduce-scatter inside the partition group,
then all-reduce across replicas. Across slow inter-node links the second hop decides throughput (on
2 emulated nodes, HSDP two-hop ran at 11.9k tokens/s per GPU with fp32 reduction and 20.1k with bf16,
DESIGN.md §7), while inside a node full precision costs little. With
``MixedPrecision(replica_reduce_dtype=...)`` FSDP2 shards over the partition group only and this
module performs the replica all-reduce in an FSDP2 all-reduce hook, in its own dtype, on FSDP2's
all-reduce stream (so it still overlaps with the rest of backward).

Two-hop accumulation is done here as well: while deferring, each unit's reduce-scatter output is
added to a pending buffer (kept in the partition hop's dtype) and zeroed before FSDP2 accumulates it,
so the accumulated gradient crosses the replication group once, on the first backward not deferred.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class ReplicaReduction:
    """All-reduce over the replication group in ``dtype``, deferred while ``deferring`` is set."""

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype) -> None:
        self.group, self.dtype = group, dtype
        self.deferring = False
        self._pending: dict[int, torch.Tensor] = {}

    def hook_for(self, unit_id: int) -> Callable[[torch.Tensor], None]:
        """The all-reduce hook of one FSDP2 unit; ``reduce_output`` is its reduce-scatter output."""

        def reduce_across_replicas(reduce_output: torch.Tensor) -> None:
            pending = self._pending.get(unit_id)
            if self.deferring:
                if pending is None:
                    self._pending[unit_id] = reduce_output.clone()
                else:
                    pending += reduce_output
                reduce_output.zero_()  # FSDP2 adds this to the gradient: the partial sum waits here instead
                return
            if pending is not None:
                reduce_output += self._pending.pop(unit_id)
            wire = reduce_output.to(self.dtype)
            dist.all_reduce(wire, op=dist.ReduceOp.AVG, group=self.group)
            if wire is not reduce_output:
                reduce_output.copy_(wire)

        return reduce_across_replicas
