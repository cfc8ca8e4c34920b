"""Optimizer states sharded across replicas: MiCS's memory, beyond MiCS.

MiCS keeps one full, sharded copy of the optimizer states in every partition group, so each GPU
holds ``1/P`` of them where ZeRO-3 holds ``1/W``. Here each replica rank keeps the optimizer state of
only ``1/R`` of its partition shard (``R = W/P`` replicas), which brings optimizer memory down to
ZeRO-3's ``1/W`` while parameters stay sharded only inside the (fast) partition group. The replica
hop changes shape but not volume: instead of all-reducing the gradient, each unit's gradient is
reduce-scattered over the replication group, the optimizer updates its slice, and the updated slices
are all-gathered (PyTorch users ask for exactly this: pytorch/pytorch#117968, #148257).

The reduce-scatter of a unit starts as soon as FSDP2 has reduced that unit's gradient inside the
partition group, overlapping with the rest of backward, and runs once per optimizer step under
:func:`torchmics.no_replica_sync` (see :class:`torchmics.replica.ReplicaHop`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchmics._fsdp import all_gather_single, reduce_scatter_single
from torchmics.quantized import QuantizedReplicaHop, aligned_chunk
from torchmics.replica import ReplicaHop, pack, units_of_params
from torchmics.sharding import shard_state


@dataclass
class _UnitSlices:
    """One unit's local shards laid end to end as one flat vector, cut into one chunk per replica rank.

    Replica rank ``r`` owns elements ``[r * chunk, (r + 1) * chunk)`` of that vector: one
    reduce-scatter and one all-gather per unit move it, and the owned part of each parameter (its
    *slice*, possibly empty) is a view into FSDP2's local shard, so the inner optimizer updates the
    sharded parameters in place. Every range is computed once here: the per-step work is a handful
    of multi-tensor copies, which keeps the CPU cost per step small next to a step on fast links.
    """

    params: list[DTensor]
    flats: list[torch.Tensor]  # each parameter's local shard, flat (views that live as long as FSDP2's shards)
    starts: list[int]  # where each local shard begins in the unit's flat vector
    owned: list[slice]  # each parameter's owned part, in its flat local shard
    in_chunk: list[slice]  # where that part lies in this rank's chunk
    chunk: int
    slices: list[nn.Parameter]

    @classmethod
    def build(cls, params: list[DTensor], replicas: int, index: int, align: int) -> _UnitSlices:
        flats = [p.to_local().detach().view(-1) for p in params]
        starts = [sum(f.numel() for f in flats[:i]) for i in range(len(flats))]
        chunk = aligned_chunk(sum(f.numel() for f in flats), replicas, align)
        owned, in_chunk = [], []
        for flat, start in zip(flats, starts):
            low = index * chunk - start  # where this rank's chunk begins, in the parameter's coordinates
            part = slice(min(max(low, 0), flat.numel()), min(max(low + chunk, 0), flat.numel()))
            owned.append(part)
            shift = max(0, min(part.start - low, chunk))  # an empty part sits anywhere: keep it in range
            in_chunk.append(slice(shift, shift + part.stop - part.start))
        slices = [nn.Parameter(flat[part]) for flat, part in zip(flats, owned)]
        return cls(params, flats, starts, owned, in_chunk, chunk, slices)

    def pack_gradients(self, dtype: torch.dtype, replicas: int) -> torch.Tensor:
        """The reduce-scatter input: every local gradient (zeros where absent) in ``dtype``, padded."""
        grads = [p.grad.to_local() if p.grad is not None else torch.zeros_like(f) for p, f in zip(self.params, self.flats)]
        return pack(grads, replicas * self.chunk, dtype)

    def pack_owned(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """This rank's chunk assembled from one tensor per parameter shaped like its slice."""
        chunk = torch.zeros(self.chunk, dtype=dtype, device=self.slices[0].device)
        torch._foreach_copy_([chunk[where] for where in self.in_chunk], parts)
        return chunk

    def unpack(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """Views of an all-gathered vector shaped like each parameter's local shard."""
        return [gathered[s : s + f.numel()].view_as(p.to_local()) for p, f, s in zip(self.params, self.flats, self.starts)]

    def write_others(self, gathered: torch.Tensor) -> None:
        """Copy an all-gathered vector into the local shards, except the owned slices (kept exact)."""
        targets, sources = [], []
        for flat, start, owned in zip(self.flats, self.starts, self.owned):
            source = gathered[start : start + flat.numel()]
            targets += [flat[: owned.start], flat[owned.stop :]]
            sources += [source[: owned.start], source[owned.stop :]]
        torch._foreach_copy_(targets, sources)


# torch.optim's optimizers whose update of an element depends on others of its parameter: Adafactor factors
# the second moment over a matrix's rows and columns, L-BFGS works on all parameters as one vector.
_NOT_ELEMENTWISE = ("Adafactor", "LBFGS")


class ReplicaShardedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose state covers only this rank's slice of its shard.

    The inner optimizer steps flat 1-D slices of parameters, so it must update each element on its own
    (AdamW, Adam, SGD with momentum, Adagrad...): one that uses a parameter's shape or its other elements
    (Adafactor, LAMB, Muon, L-BFGS) would compute another update; torch's Adafactor and L-BFGS are refused.

    ``ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=3e-4)`` builds the inner optimizer
    (``.inner``) on views of the owned slices, so the inner update writes straight into FSDP2's
    sharded parameters. ``param_groups`` and ``state`` *are* the inner optimizer's (the same
    objects), so ``torch.optim.lr_scheduler`` schedulers and code that sets ``group["lr"]`` work
    unchanged. After backward, ``p.grad`` of the model holds partition-reduced gradients only; the
    fully reduced gradient of each slice is its ``grad`` once :meth:`reduce_gradients` ran
    (:meth:`step` and :func:`torchmics.clip_grad_norm_` call it). Every replica must use the same
    parameters in each backward (as with DDP without ``find_unused_parameters``), so that
    collectives match.

    :meth:`state_dict` is torch's format for the inner optimizer: the state of *this rank's slices*
    (parameter ids are slice indices), so it restores this rank of the same job (same model, world
    and partition size); :func:`torchmics.save_checkpoint` writes the whole, topology-free state
    instead (:meth:`sharded_state_dict`), interchangeable with a plain optimizer's.
    """

    def __init__(self, model: nn.Module, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        state = shard_state(model)
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(
                f"ReplicaShardedOptimizer takes the optimizer's class and its arguments, got {optimizer_class!r}: "
                "write ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=...), not an optimizer already built."
            )
        if optimizer_class.__name__ in _NOT_ELEMENTWISE:
            raise ValueError(
                f"ReplicaShardedOptimizer cannot run {optimizer_class.__name__}: it steps flat slices of each "
                "parameter, which is exact only for optimizers that update each element on its own (AdamW, Adam, "
                "SGD, ...); build it on model.parameters() of a model sharded without shard_optimizer_across_replicas."
            )
        if not state.optimizer_over_replicas:
            raise ValueError(
                "ReplicaShardedOptimizer needs a model sharded with "
                "torchmics.shard(..., shard_optimizer_across_replicas=True); for a model sharded without it, "
                "build the optimizer on model.parameters() as usual."
            )
        if state.optimizer is not None:
            raise ValueError("this model already has a ReplicaShardedOptimizer; build one optimizer per model.")
        self.model = model
        self.group = state.topology.mesh.get_group("replicate")
        self.replicas, index = self.group.size(), self.group.rank()
        self.wire_dtype = state.mixed_precision.replica_hop_dtype
        self.compute_dtype = state.mixed_precision.param_dtype
        compressed = state.mixed_precision.quantized_replica_hop
        self.quantized = QuantizedReplicaHop(compressed, self.group) if compressed else None
        align = compressed.block_size if compressed else 1  # a quantized block has one owner
        params_per_unit = units_of_params(state.units)
        self.units = [_UnitSlices.build(params, self.replicas, index, align) for params in params_per_unit]
        self._name_of = {id(p): name for name, p in model.named_parameters()}
        self.names = [self._name_of[id(p)] for unit in self.units for p in unit.params]
        self.slices = [s for unit in self.units for s in unit.slices]
        self.inner = optimizer_class(self.slices, **kwargs)
        # Optimizer's own set-up (hooks, step profiling) around the inner optimizer's groups, which it
        # re-adds unchanged through the setters below.
        super().__init__(list(self.inner.param_groups), self.inner.defaults)
        self._pending: dict[int, torch.Tensor] = {}  # unit -> its reduce-scatter output, not yet handed out
        self._hop = ReplicaHop(params_per_unit, self._reduce_scatter, lambda: state.in_no_replica_sync, model)
        state.optimizer = self  # clipping and full state dicts go through the owned slices

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.inner.param_groups = groups

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, state: dict[torch.Tensor, Any]) -> None:
        self.inner.state = state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Where ``load_state_dict`` hands over the loaded ``state`` and ``param_groups``: to the inner
        optimizer, whose class completes them (AdamW fills in group defaults and tensor steps)."""
        self.inner.__setstate__(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of this rank; raises when it holds another rank's or topology's slices."""
        for index, entry in state_dict["state"].items():
            if index < len(self.slices):  # a count that differs is torch's error (different group sizes)
                self._check_fits(index, entry)
        super().load_state_dict(state_dict)

    def _check_fits(self, index: int, entry: dict[str, Any]) -> None:
        expected = self.slices[index].numel()
        sizes = {value.numel() for value in entry.values() if isinstance(value, torch.Tensor) and value.dim()}
        if sizes - {expected}:
            raise ValueError(
                f"this state dict does not hold this rank's slices (slice {index} has {expected} elements here, "
                f"its state {sorted(sizes)}): a ReplicaShardedOptimizer's state_dict restores the same rank of "
                "the same job only. To move to another rank, world or partition size, use "
                "torchmics.save_checkpoint / load_checkpoint."
            )

    def _reduce_scatter(self, u: int) -> None:
        with self._hop.side_stream():
            if self.quantized is not None:
                mine = self.quantized.reduce_scatter(u, self.units[u].pack_gradients(torch.float32, self.replicas))
            else:
                send = self.units[u].pack_gradients(self.wire_dtype or self.slices[0].dtype, self.replicas)
                mine = torch.empty(self.units[u].chunk, dtype=send.dtype, device=send.device)
                reduce_scatter_single(mine, send, op=dist.ReduceOp.AVG, group=self.group)
        self._pending[u] = mine

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Finish the replica hop and give each slice its gradient; idempotent within a step.

        Units whose reduce-scatter did not start during backward (every micro-step ran under
        ``no_replica_sync``) are reduced here, in unit order.
        """
        self._hop.flush()
        self._hop.wait()
        for u, reduced in self._pending.items():
            unit = self.units[u]
            if self._hop.on_gpu:
                reduced.record_stream(torch.cuda.current_stream())  # made on the hop's stream, read here
            reduced = reduced.to(unit.slices[0].dtype)
            for param, owned, where in zip(unit.params, unit.slices, unit.in_chunk):
                # no gradient, no update (as torch.optim)
                owned.grad = reduced[where] if param.grad is not None else None
        self._pending.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Finish the replica reduce-scatter, step on the owned slices, all-gather the updated slices.

        ``closure`` (torch's contract: it recomputes the loss, with its backward) runs first, so its
        gradients are the ones reduced; its loss is returned.

        The all-gather sends the updated slices in the compute dtype (``param_dtype``): what other
        replicas hold of a slice they do not own is only ever cast to that dtype for forward and
        backward, so the rounding changes no result and the replica hop moves the bytes of an
        all-reduce. The full-precision values stay with their owner; :meth:`synchronize_master_weights`
        gathers them before anything reads whole parameters (checkpoints, ``full_state_dict``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        self.inner.step()
        self._all_gather_slices(self.compute_dtype)
        return loss

    @torch.no_grad()
    def synchronize_master_weights(self) -> None:
        """Give every replica the owners' full-precision values of every slice."""
        if self.compute_dtype is not None:
            self._all_gather_slices(None)

    def _all_gather_slices(self, dtype: torch.dtype | None) -> None:
        """All-gather every unit's owned chunk (in ``dtype``) into the other replicas' shards."""
        # all launched before any is waited for: they queue back to back
        gathers = [(unit, *self._gather(unit, [s.detach() for s in unit.slices], dtype)) for unit in self.units]
        for unit, rows, work in gathers:
            work.wait()
            unit.write_others(rows)

    def _gather(
        self, unit: _UnitSlices, parts: list[torch.Tensor], dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, dist.Work]:
        """Start the all-gather of this rank's chunk of ``unit``, assembled from ``parts`` (one per slice)."""
        mine = unit.pack_owned(parts, dtype or parts[0].dtype)
        rows = torch.empty(self.replicas * unit.chunk, dtype=mine.dtype, device=mine.device)
        return rows, all_gather_single(rows, mine, group=self.group, async_op=True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the global norm (what :func:`torchmics.clip_grad_norm_` calls for this optimizer).

        Every gradient element lies in exactly one rank's owned slice once the replica reduce-scatter
        ran, so one reduction of the slices' norms over the whole world is exact.
        """
        self.reduce_gradients()
        grads = [s.grad for s in self.slices if s.grad is not None and s.grad.numel()]
        local = torch.nn.utils.get_total_norm(grads, norm_type=norm_type) if grads else torch.zeros(())
        local = local.to(self.slices[0].device)
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
            total = local
        else:
            local = local.pow(norm_type)
            dist.all_reduce(local)
            total = local.pow(1.0 / norm_type)
        torch.nn.utils.clip_grads_with_norm_(self.slices, max_norm, total)
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the model's partition-reduced gradients, the slices' gradients and any pending replica hop."""
        self.model.zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)
        self._pending.clear()
        self._hop.reset()

    def sharded_state_dict(self) -> dict[str, Any]:
        """The state a plain optimizer would have under FSDP2 (DTensors keyed by parameter name).

        Slices are all-gathered over the replication group into shard-shaped DTensors, so checkpoints
        are interchangeable with those of an ordinary optimizer and reshard to any topology. A fresh
        optimizer's state is created first (with a zero-learning-rate step), so that loading has a
        template of the right shapes, as ``torch.distributed.checkpoint.state_dict`` does.
        """
        if not self.inner.state:
            self._create_state()
        self.synchronize_master_weights()
        state: dict[str, dict[str, Any]] = {}
        for unit in self.units:
            # A parameter that never had a gradient has no state, on every replica alike.
            entries = [self.inner.state.get(owned, {}) for owned in unit.slices]
            per_param: list[dict[str, Any]] = [{} for _ in unit.params]
            for key, value in next((e for e in entries if e), {}).items():
                if value.dim():
                    parts = [e[key] if key in e else torch.zeros_like(s) for e, s in zip(entries, unit.slices)]
                    for i, local in enumerate(self._gather_state(unit, parts)):
                        if entries[i]:
                            per_param[i][key] = self._as_dtensor(local, unit.params[i])
                else:  # scalars (``step``) are the same for every slice
                    for i, entry in enumerate(entries):
                        if entry:
                            per_param[i][key] = entry[key].clone()
            state.update((self._name_of[id(p)], entry) for p, entry in zip(unit.params, per_param) if entry)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(self.names)} for g in self.inner.param_groups]
        return {"state": state, "param_groups": groups}

    def _gather_state(self, unit: _UnitSlices, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        rows, work = self._gather(unit, parts, None)
        work.wait()
        return unit.unpack(rows)

    @staticmethod
    def _as_dtensor(local: torch.Tensor, param: DTensor) -> DTensor:
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)

    def _create_state(self) -> None:
        learning_rates = [group["lr"] for group in self.inner.param_groups]
        for group in self.inner.param_groups:
            group["lr"] = 0.0
        for owned in self.slices:
            owned.grad = torch.zeros_like(owned)
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        for group, lr in zip(self.inner.param_groups, learning_rates):
            group["lr"] = lr

    def load_sharded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`sharded_state_dict`: keep this rank's slice of every state tensor."""
        by_name = {self._name_of[id(p)]: (unit, i) for unit in self.units for i, p in enumerate(unit.params)}
        self.inner.state.clear()  # a parameter absent from ``state_dict`` had no state when saved
        for name, entries in state_dict["state"].items():
            unit, i = by_name[name]
            owned = unit.owned[i]
            self.inner.state[unit.slices[i]] = {
                key: value.to_local().reshape(-1)[owned].clone() if isinstance(value, DTensor) else value.clone()
                for key, value in entries.items()
            }
        for group, saved in zip(self.inner.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
