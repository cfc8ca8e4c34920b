"""Optimizer states sharded across replicas: MiCS's memory, beyond MiCS.

MiCS keeps one full, sharded copy of the optimizer states in every partition group, so each GPU
holds ``1/P`` of them where ZeRO-3 holds ``1/W``. Here each replica rank keeps the optimizer state of
only ``1/R`` of its partition shard (``R = W/P`` replicas), which brings optimizer memory down to
ZeRO-3's ``1/W`` while parameters stay sharded only inside the (fast) partition group. The replica
hop changes shape but not volume: instead of all-reducing the gradient, the step reduce-scatters it
over the replication group, updates its slice, and all-gathers the updated slice (PyTorch users ask
for exactly this: pytorch/pytorch#117968, #148257).

Use it with a model sharded by ``shard(..., shard_optimizer_across_replicas=True)``; in that mode
FSDP2 reduces gradients only inside the partition group and the replica hop happens in
:meth:`ReplicaShardedOptimizer.step` (so it is two-hop by construction: once per optimizer step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchmics.sharding import shard_state


class ReplicaShardedOptimizer:
    """Wraps any ``torch.optim`` optimizer so that its state covers this rank's slice of its shard.

    ``ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=3e-4)`` builds the inner optimizer on
    views of the owned slices, so the inner update writes straight into FSDP2's sharded parameters.
    ``param_groups`` is the inner optimizer's (learning-rate schedules work unchanged). After
    backward, ``p.grad`` of the model holds partition-reduced gradients only; the replica reduction
    happens in :meth:`reduce_gradients` (called by :meth:`step` and :func:`torchmics.clip_grad_norm_`).
    """

    def __init__(self, model: nn.Module, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        state = shard_state(model)
        if not state.optimizer_across_replicas:
            raise ValueError(
                "ReplicaShardedOptimizer needs a model sharded with "
                "torchmics.shard(..., shard_optimizer_across_replicas=True); for a model sharded without it, "
                "build the optimizer on model.parameters() as usual."
            )
        self.model = model
        self.group = state.topology.mesh.get_group("replicate")
        self.replicas, self.index = self.group.size(), self.group.rank()
        self.wire_dtype = state.mixed_precision.replica_reduce_dtype
        self.compute_dtype = state.mixed_precision.param_dtype
        names = {id(p): name for name, p in model.named_parameters()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [names[id(p)] for p in self.params]
        self.chunks = [math.ceil(p.to_local().numel() / self.replicas) for p in self.params]
        self.slices = [nn.Parameter(self._owned(p, c), requires_grad=True) for p, c in zip(self.params, self.chunks)]
        self.inner = optimizer_class(self.slices, **kwargs)
        self._reduced = False
        state.optimizer = self  # clipping and full state dicts go through the owned slices

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def _owned_range(self, chunk: int, numel: int) -> slice:
        """This rank's part of a flat tensor of ``numel`` elements cut into ``chunk``-sized rows."""
        return slice(min(self.index * chunk, numel), min((self.index + 1) * chunk, numel))

    def _owned(self, param: DTensor, chunk: int) -> torch.Tensor:
        flat = param.to_local().detach().view(-1)
        return flat[self._owned_range(chunk, flat.numel())]

    def _padded_rows(self, flat: torch.Tensor, chunk: int) -> torch.Tensor:
        """``flat`` zero-padded to ``replicas * chunk`` and viewed as one row per replica rank."""
        return torch.nn.functional.pad(flat, (0, self.replicas * chunk - flat.numel())).view(self.replicas, chunk)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter every gradient over the replication group (mean); idempotent within a step."""
        if self._reduced:
            return
        grads = [p.grad.to_local().view(-1) if p.grad is not None else torch.zeros_like(p.to_local()).view(-1)
                 for p in self.params]
        dtype = self.wire_dtype or grads[0].dtype
        send = torch.cat([self._padded_rows(g.to(dtype), c) for g, c in zip(grads, self.chunks)], dim=1)
        mine = torch.empty(send.shape[1], dtype=dtype, device=send.device)
        dist.reduce_scatter_tensor(mine, send.view(-1), op=dist.ReduceOp.AVG, group=self.group)
        for owned, part in zip(self.slices, mine.split(self.chunks)):
            owned.grad = part[: owned.numel()].to(owned.dtype)
        self._reduced = True

    @torch.no_grad()
    def step(self) -> None:
        """Replica reduce-scatter, inner step on the owned slices, replica all-gather of the result.

        The all-gather sends the updated slices in the compute dtype (``param_dtype``): what other
        replicas hold of a slice they do not own is only ever cast to that dtype for forward and
        backward, so the rounding changes no result and the replica hop moves the bytes of an
        all-reduce. The full-precision values stay with their owner; :meth:`synchronize_master_weights`
        gathers them before anything reads whole parameters (checkpoints, ``full_state_dict``).
        """
        self.reduce_gradients()
        self.inner.step()
        self._all_gather_slices(self.compute_dtype)
        self._reduced = False

    @torch.no_grad()
    def synchronize_master_weights(self) -> None:
        """Give every replica the owners' full-precision values of every slice."""
        if self.compute_dtype is not None:
            self._all_gather_slices(None)

    def _all_gather_slices(self, dtype: torch.dtype | None) -> None:
        """All-gather the owned slices (in ``dtype``) into every replica's shards, keeping the own slice."""
        mine = torch.cat([torch.nn.functional.pad(s.detach(), (0, c - s.numel())) for s, c in zip(self.slices, self.chunks)])
        mine = mine.to(dtype or mine.dtype)
        rows = torch.empty(self.replicas * mine.numel(), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(rows, mine, group=self.group)
        rows = rows.view(self.replicas, mine.numel())
        for param, part, chunk in zip(self.params, rows.split(self.chunks, dim=1), self.chunks):
            flat, gathered = param.to_local().detach().view(-1), part.reshape(-1)
            owned = self._owned_range(chunk, flat.numel())
            flat[: owned.start].copy_(gathered[: owned.start])  # the owned slice is already up to date
            flat[owned.stop :].copy_(gathered[owned.stop : flat.numel()])

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
        self.model.zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)
        self._reduced = False

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
        state = {}
        for name, param, owned, chunk in zip(self.names, self.params, self.slices, self.chunks):
            entries = self.inner.state.get(owned, {})
            state[name] = {key: self._to_dtensor(value, param, chunk) if value.dim() else value.clone()
                           for key, value in entries.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(self.names)} for g in self.inner.param_groups]
        return {"state": state, "param_groups": groups}

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

    def _to_dtensor(self, value: torch.Tensor, param: DTensor, chunk: int) -> DTensor:
        rows = torch.empty(self.replicas * chunk, dtype=value.dtype, device=value.device)
        dist.all_gather_into_tensor(rows, torch.nn.functional.pad(value, (0, chunk - value.numel())), group=self.group)
        local = rows[: param.to_local().numel()].view_as(param.to_local())
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False)

    def load_sharded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`sharded_state_dict`: keep this rank's slice of every state tensor."""
        by_name = dict(zip(self.names, zip(self.slices, self.chunks)))
        for name, entries in state_dict["state"].items():
            owned, chunk = by_name[name]
            self.inner.state[owned] = {
                key: self._owned_part(value, chunk) if isinstance(value, DTensor) else value.clone()
                for key, value in entries.items()
            }
        for group, saved in zip(self.inner.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _owned_part(self, value: DTensor, chunk: int) -> torch.Tensor:
        flat = value.to_local().reshape(-1)
        return flat[self._owned_range(chunk, flat.numel())].clone()
