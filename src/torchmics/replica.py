"""The replica hop, when torchmics runs it instead of FSDP2: per unit, as soon as its gradients exist.

FSDP2's HSDP reduces gradients in one dtype on both hops: reduce-scatter inside the partition group,
then all-reduce across replicas. Across slow inter-node links the second hop decides throughput (a
bf16 replica hop is measured in docs/design.md §7), while inside a node full precision costs little. And MiCS's replica all-reduce leaves
a full copy of the optimizer states in every partition group. For both (``MixedPrecision(
replica_reduce_dtype=...)`` and :class:`torchmics.ReplicaShardedOptimizer`) FSDP2 shards over the
partition group only and torchmics runs the replica hop.

FSDP2 calls each sharded parameter's post-accumulate-grad hooks once its partition-reduced gradient
is in ``.grad`` (summed over the micro-steps so far, in the parameter's dtype; not a public contract:
see :mod:`torchmics._fsdp`, and :meth:`ReplicaHop.check_delivered`, which makes sure it held). When the last
gradient of a unit arrives in a backward outside :func:`torchmics.no_replica_sync`, the unit's
replica collective starts on a stream of its own, so it overlaps with the backward of the units
before it, as HSDP's all-reduce does; at the end of backward the compute stream waits for it. Under
``no_replica_sync`` the hooks only take note: FSDP2 accumulates into ``.grad`` and the replica hop
runs once per optimizer step (two-hop), with no buffer besides the gradient itself. (Accumulating
*without* ``no_replica_sync`` reduces the accumulated gradient at every backward: correct, but it
sends the whole gradient each time, as FSDP2 does, and rounds it again in a bf16 hop.)
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchmics import _fsdp
from torchmics.quantized import Quantized, QuantizedReplicaHop, aligned_chunk


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

    A unit that is not complete by the end of a backward outside deferral (some parameter got no
    gradient, or the unit got gradients only in deferred micro-steps) is handed to ``collective`` at
    the end of that backward instead. Every replica must use the same parameters in each backward,
    as with DDP without ``find_unused_parameters``, so that the collectives match across replicas.
    """

    def __init__(self, params_per_unit: list[list[DTensor]], collective: Callable[[int], None],
                 deferred: Callable[[], bool], root: nn.Module) -> None:
        self.params_per_unit = params_per_unit
        self._collective, self._deferred = collective, deferred
        device = params_per_unit[0][0].device if params_per_unit else torch.device("cpu")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._arrived = [0] * len(params_per_unit)  # gradients delivered in this backward, per unit
        self._waiting: set[int] = set()  # units holding gradients that no collective has reduced yet
        self._end_queued = False
        self._delivered: dict[int, weakref.ref] = {}  # id(param) -> the gradient FSDP2 last handed its hook
        for u, params in enumerate(params_per_unit):
            for param in params:
                _fsdp.register_gradient_hook(param, lambda p, u=u: self._on_gradient(u, p))
        root.register_forward_pre_hook(lambda *_: self._start_iteration())
        root.register_forward_hook(lambda _module, _args, output: self._watch_backward(output))

    def _start_iteration(self) -> None:
        """Forget a backward that never finished (an exception inside it), so the next one starts clean."""
        self._arrived = [0] * len(self.params_per_unit)
        self._end_queued = False

    def reset(self) -> None:
        """Drop everything pending: the gradients were discarded (``zero_grad``)."""
        self._start_iteration()
        self._waiting.clear()

    def _on_gradient(self, u: int, param: DTensor) -> None:
        self._delivered[id(param)] = weakref.ref(param.grad)
        self._waiting.add(u)
        if self._deferred():
            return
        if not self._end_queued:  # FSDP2 finalizes its own reductions the same way
            _fsdp.queue_end_of_backward(self._end_of_backward)
            self._end_queued = True
        self._arrived[u] += 1
        if self._arrived[u] == len(self.params_per_unit[u]):
            self._run(u)

    def _run(self, u: int) -> None:
        self._arrived[u] = 0
        self._waiting.discard(u)
        self._collective(u)

    def unreduced_units(self) -> int:
        """Units holding gradients that no replica collective has reduced: every backward since ran deferred."""
        return len(self._waiting)

    def flush(self) -> None:
        """Run the collective of every unit still holding unreduced gradients, in unit order."""
        for u in sorted(self._waiting):  # the same order on every replica
            self._run(u)

    def check_delivered(self) -> None:
        """Raise if a parameter holds a gradient that FSDP2 never handed to its hook.

        The hop only learns of gradients through those hooks; one that bypassed them would never be
        reduced across replicas, and the replicas would drift apart without an error. Checked after
        every backward through the model (deferred or not), before an optimizer can step on them.
        """
        bypassed = sum(self._bypassed_hook(p) for params in self.params_per_unit for p in params)
        if bypassed:
            raise RuntimeError(
                f"FSDP2 put gradients into {bypassed} sharded parameters without calling their post-accumulate-grad "
                "hooks, so torchmics' replica hop never saw them and they would not be reduced across replicas. "
                f"This FSDP2 (torch {torch.__version__}) does not behave as torch {_fsdp.tested_range()} does "
                "(torchmics/_fsdp.py lists what torchmics relies on); use a tested torch, or shard without replica_reduce_dtype and optimizer states "
                "over replicas so that FSDP2 runs the replica all-reduce itself."
            )

    def _end_of_backward(self) -> None:
        self.flush()
        self.wait()
        self._end_queued = False

    def _watch_backward(self, output: Any) -> None:
        """Have :meth:`check_delivered` run after the backward of this forward's outputs, if one comes.

        A hook on the outputs, not on the parameters: it must not depend on what it checks.
        """
        tensors = [t for t in _tensors(output) if t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(
                tensors, lambda _: _fsdp.queue_after_backward(self.check_delivered), mode="any"
            )

    def _bypassed_hook(self, param: DTensor) -> bool:
        seen = self._delivered.get(id(param))
        return param.grad is not None and (seen is None or seen() is not param.grad)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Run on the hop's own stream, after what the current stream has queued (a no-op on CPU)."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            yield

    @property
    def on_gpu(self) -> bool:
        return self._stream is not None

    def wait(self) -> None:
        """Make the current stream wait for every replica collective queued so far."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)


def _tensors(output: Any) -> Iterable[torch.Tensor]:
    """The tensors of a forward's output: a tensor, or one inside mappings (``ModelOutput``) and sequences."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _tensors(value)


def pack(tensors: list[torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``tensors`` flattened end to end into one new ``numel``-element buffer of ``dtype`` (zero tail)."""
    flat = torch.empty(numel, dtype=dtype, device=tensors[0].device)
    filled = sum(t.numel() for t in tensors)
    flat[filled:].zero_()
    torch._foreach_copy_(list(flat[:filled].split([t.numel() for t in tensors])), [t.reshape(-1) for t in tensors])
    return flat


def unpack(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the start of ``flat`` back into ``tensors``, end to end: the inverse of :func:`pack`."""
    sizes = [t.numel() for t in tensors]
    torch._foreach_copy_([t.view(-1) for t in tensors], list(flat[: sum(sizes)].split(sizes)))


class ReplicaAllReduce:
    """All-reduce (mean) each unit's gradients over the replication group in ``dtype``: precision per hop.

    A :class:`~torchmics.quantized.Quantized` format runs the all-reduce as a quantized
    reduce-scatter and all-gather instead (:class:`~torchmics.quantized.QuantizedReplicaHop`).
    """

    def __init__(self, units: list[nn.Module], group: dist.ProcessGroup, dtype: torch.dtype | Quantized,
                 deferred: Callable[[], bool], root: nn.Module) -> None:
        self.group, self.dtype = group, dtype
        self.quantized = QuantizedReplicaHop(dtype, group) if isinstance(dtype, Quantized) else None
        self.hop = ReplicaHop(units_of_params(units), self._all_reduce, deferred, root)

    def _all_reduce(self, u: int) -> None:
        grads = [p.grad.to_local() for p in self.hop.params_per_unit[u] if p.grad is not None]
        if not grads:
            return
        with self.hop.side_stream():
            if self.quantized is None:
                wire = pack(grads, sum(g.numel() for g in grads), self.dtype)
                dist.all_reduce(wire, op=dist.ReduceOp.AVG, group=self.group)
                unpack(wire, grads)
            else:
                self._quantized_all_reduce(u)

    def _quantized_all_reduce(self, u: int) -> None:
        """The unit's gradients in place; a parameter without one sends zeros, so the residuals keep one layout."""
        q = self.quantized
        params = self.hop.params_per_unit[u]
        local = [p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local()) for p in params]
        numel = sum(t.numel() for t in local)
        wire = pack(local, q.replicas * aligned_chunk(numel, q.replicas, q.format.block_size), torch.float32)
        unpack(q.all_gather(u, q.reduce_scatter(u, wire)), local)
