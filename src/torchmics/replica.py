"""The replica hop, when torchmics runs it instead of FSDP2: per unit, as soon as its gradients exist.

FSDP2's HSDP reduces gradients in one dtype on both hops: reduce-scatter inside the partition group,
then all-reduce across replicas. Across slow inter-node links the second hop decides throughput (on
2 emulated nodes, HSDP two-hop ran at 11.9k tokens/s per GPU with fp32 reduction and 20.1k with bf16,
DESIGN.md §7), while inside a node full precision costs little. And MiCS's replica all-reduce leaves
a full copy of the optimizer states in every partition group. For both (``MixedPrecision(
replica_reduce_dtype=...)`` and :class:`torchmics.ReplicaShardedOptimizer`) FSDP2 shards over the
partition group only and torchmics runs the replica hop.

FSDP2 calls each sharded parameter's post-accumulate-grad hooks once its partition-reduced gradient
is in ``.grad`` (summed over the micro-steps so far, in the parameter's dtype). When the last
gradient of a unit arrives in a backward outside :func:`torchmics.no_replica_sync`, the unit's
replica collective starts on a stream of its own, so it overlaps with the backward of the units
before it, as HSDP's all-reduce does; at the end of backward the compute stream waits for it. Under
``no_replica_sync`` the hooks do nothing: FSDP2 accumulates into ``.grad`` and the replica hop runs
once per optimizer step (two-hop), with no buffer besides the gradient itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def units_of_params(units: list[nn.Module]) -> list[list[DTensor]]:
    """The trainable parameters each unit communicates (units come children first: each counts once)."""
    seen: set[int] = set()
    groups = []
    for unit in units:
        params = [p for p in unit.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append(params)
    return groups


class ReplicaHop:
    """Calls ``collective(u)`` once FSDP2 has delivered every gradient of unit ``u`` (outside deferral).

    A unit some of whose parameters got no gradient in a backward is handed to ``collective`` at the
    end of that backward instead. Every replica must use the same parameters in each backward, as
    with DDP without ``find_unused_parameters``, so that the collectives match across replicas.
    """

    def __init__(self, params_per_unit: list[list[DTensor]], collective: Callable[[int], None],
                 deferred: Callable[[], bool]) -> None:
        self.params_per_unit = params_per_unit
        self._collective, self._deferred = collective, deferred
        device = params_per_unit[0][0].device if params_per_unit else torch.device("cpu")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._arrived = [0] * len(params_per_unit)
        self._end_queued = False
        for u, params in enumerate(params_per_unit):
            for param in params:
                param.register_post_accumulate_grad_hook(lambda _, u=u: self._on_gradient(u))

    def _on_gradient(self, u: int) -> None:
        if self._deferred():
            return
        if not self._end_queued:  # FSDP2 finalizes its own reductions the same way
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_queued = True
        self._arrived[u] += 1
        if self._arrived[u] == len(self.params_per_unit[u]):
            self._arrived[u] = 0
            self._collective(u)

    def _end_of_backward(self) -> None:
        for u, arrived in enumerate(self._arrived):
            if arrived:  # some parameter of the unit was not used in this backward
                self._arrived[u] = 0
                self._collective(u)
        self.wait()
        self._end_queued = False

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Run on the hop's own stream, after what the current stream has queued (a no-op on CPU)."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            yield

    def wait(self) -> None:
        """Make the current stream wait for every replica collective queued so far."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)


def pack(tensors: list[torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``tensors`` flattened end to end into one new ``numel``-element buffer of ``dtype`` (zero tail)."""
    flat = torch.empty(numel, dtype=dtype, device=tensors[0].device)
    filled = sum(t.numel() for t in tensors)
    flat[filled:].zero_()
    torch._foreach_copy_(list(flat[:filled].split([t.numel() for t in tensors])), [t.reshape(-1) for t in tensors])
    return flat


class ReplicaAllReduce:
    """All-reduce (mean) each unit's gradients over the replication group in ``dtype``: precision per hop."""

    def __init__(self, units: list[nn.Module], group: dist.ProcessGroup, dtype: torch.dtype,
                 deferred: Callable[[], bool]) -> None:
        self.group, self.dtype = group, dtype
        self.hop = ReplicaHop(units_of_params(units), self._all_reduce, deferred)

    def _all_reduce(self, u: int) -> None:
        grads = [p.grad.to_local() for p in self.hop.params_per_unit[u] if p.grad is not None]
        if not grads:
            return
        with self.hop.side_stream():
            wire = pack(grads, sum(g.numel() for g in grads), self.dtype)
            dist.all_reduce(wire, op=dist.ReduceOp.AVG, group=self.group)
            torch._foreach_copy_([g.view(-1) for g in grads], list(wire.split([g.numel() for g in grads])))
