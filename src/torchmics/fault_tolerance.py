"""Replica groups that fail alone: each MiCS partition group is one torchft replica group.

Every partition group holds a whole (sharded) copy of parameters, gradients and optimizer states, so a
group that dies loses nothing the others lack. torchft (PyTorch's fault-tolerance engine) provides
the rest: its lighthouse decides, step by step, which replica groups form the quorum; its ``Manager``
reconfigures a process group over the live groups and copies a live group's state to one that
rejoins. torchmics writes no quorum protocol of its own.

Inside a replica group nothing changes: it is its own job (torchrun or spawned) of ``P`` ranks whose
world is the partition group, sharded by FSDP2 exactly as without fault tolerance (hierarchically when
it spans nodes). Only the replica hop moves: rank ``r`` of every live group all-reduces the
gradient of its shard ``r`` through ``Manager.allreduce``, per unit as soon as FSDP2 has delivered it,
once per optimizer step under :func:`torchmics.no_replica_sync` (the same :class:`ReplicaHop` as the
bf16 replica hop). The optimizer steps only when ``Manager.should_commit()`` says every live group
got through the step; otherwise the step is repeated with the new quorum, so no group ever applies a
gradient another did not.

A group that rejoins asks the quorum at its first step, learns it is behind and, before its forward,
receives from a live group the state of the same rank (its local parameter shards, the optimizer
state of those shards, the model's buffers, torchft's step counter; :func:`heal_state`) over torchft's
checkpoint transport: not from disk.
Batches are a function of (step, group index) only (see ``data_rank``), so its data is right too.

The replica-sharded optimizer is refused: there each replica owns the only copy of one slice of the
optimizer state, which a lost group would take with it.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from datetime import timedelta
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchmics import _fsdp
from torchmics.replica import ReplicaHop, pack, units_of_params, unpack
from torchmics.sharding import shard_state
from torchmics.topology import device_type

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
INSTALL_HINT = "pip install 'torchmics[ft]'"
START_LIGHTHOUSE = "torchft_lighthouse --min_replicas 1 --join_timeout_ms 10000"


def require_torchft() -> None:
    """Raise a one-line ImportError naming the install command when torchft is missing."""
    try:
        import torchft  # noqa: F401
    except ImportError as err:
        raise ImportError(f"fault-tolerant training needs torchft ({err}); install it with {INSTALL_HINT}") from None


def lighthouse_address(flag: str | None) -> str:
    """The lighthouse to join: ``--lighthouse``, else ``$TORCHFT_LIGHTHOUSE``; an error naming both when neither is set."""
    address = flag or os.environ.get(LIGHTHOUSE_ENV)
    if not address:
        raise ValueError(f"fault-tolerant training needs torchft's lighthouse: pass --lighthouse http://HOST:29510 or set "
                         f"{LIGHTHOUSE_ENV} (start one with `{START_LIGHTHOUSE}`)")
    return address if "://" in address else f"http://{address}"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in one line when nothing listens at ``address``, before any collective could wait on it."""
    parsed = urllib.parse.urlsplit(address)
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if host is None or port is None:
        raise ValueError(f"lighthouse address {address!r} is not of the form http://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"the lighthouse at {address} is unreachable ({err.strerror or err}): start it first "
                              f"(`{START_LIGHTHOUSE} --bind [::]:{port}`) or fix --lighthouse / {LIGHTHOUSE_ENV}") from None


def data_rank(group: int, groups: int, rank: int, world: int) -> tuple[int, int]:
    """(rank, world) of this process in the job's data split: group ``g`` always trains rows ``g`` of the batch.

    So a job of ``groups`` replica groups of ``world`` ranks reads the batches of a plain torchmics run
    of ``groups * world`` ranks, and a group that is down leaves its rows out of that step: the global
    batch shrinks, the others' batches stay as they were (torchft's default, documented in docs/design.md).
    """
    if not 0 <= group < groups:
        raise ValueError(f"replica group {group} is outside the job's {groups} replica groups (0..{groups - 1})")
    return group * world + rank, groups * world


def unsupported(optimizer_over_replicas: bool, offload: bool, quantized_hop: bool) -> str | None:
    """Why fault tolerance cannot run with these options, or None."""
    if optimizer_over_replicas:
        return ("optimizer states cannot be sharded across replicas: each replica group would own the only copy of a "
                "slice of them, lost with the group (drop --optimizer-over-replicas)")
    if offload:
        return ("CPU offload is not supported: the replica hop works on the gradient shards, which offloading keeps "
                "in host memory (drop --cpu-offload)")
    if quantized_hop:
        return ("a quantized replica hop is not supported: torchft's managed all-reduce sums whole tensors, and a sum of "
                "quantized values is not a quantized value (use --replica-reduce-dtype bf16)")
    return None


def check_supported(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse the layouts whose state a lost replica group would take with it (or that have no replica hop to move)."""
    state = shard_state(model)
    refused = unsupported(state.optimizer_over_replicas, state.offload, state.mixed_precision.quantized_replica_hop is not None)
    if refused:
        raise ValueError(f"fault tolerance: {refused}")
    if state.topology.num_replicas != 1:
        raise ValueError(f"under fault tolerance each replica group is its own job whose world is one partition group, "
                         f"but this one has {state.topology.num_replicas} replicas inside: start it with "
                         f"partition size = world size ({state.topology.world_size})")
    if len(optimizer.param_groups) != 1 or len(optimizer.param_groups[0]["params"]) != len(list(model.parameters())):
        raise ValueError("fault tolerance needs one optimizer param group over model.parameters(), in their order: "
                         "a rejoining group matches optimizer state to parameters by position")


class FaultTolerantReplicas:
    """This replica group's membership in a torchft job: the replica hop, the commit, live recovery.

    Use it as the loop's step counter: ``step = ft.start_step()`` before each step's forward (the
    quorum; a group behind the others is healed here and jumps ahead), then after backward and
    gradient clipping ``if ft.should_commit(): optimizer.step()``, and ``optimizer.zero_grad()`` either
    way. Every rank of the group calls both. ``timeout`` bounds every collective and transfer,
    ``quorum_timeout`` the wait for a quorum (for instance for ``min_replicas`` groups at the start).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, replica_group: int, lighthouse: str,
                 min_replicas: int = 1, timeout: timedelta = timedelta(seconds=30),
                 quorum_timeout: timedelta = timedelta(seconds=120)) -> None:
        require_torchft()
        from torchft import Manager
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        check_supported(model, optimizer)
        state = shard_state(model)
        self.model, self.optimizer = model, optimizer
        self._dtype = state.mixed_precision.replica_reduce_dtype
        pg = ProcessGroupNCCL(timeout) if device_type() == "cuda" else ProcessGroupGloo(timeout)
        # Sync quorum: a rejoining group is healed before its forward, so it trains from its first step.
        # init_sync=False: torchmics initializes every group's shards identically from the seed.
        self.manager = Manager(pg=pg, load_state_dict=self._load_state_dict, state_dict=self._state_dict,
                               min_replica_size=min_replicas, use_async_quorum=False, timeout=timeout,
                               quorum_timeout=quorum_timeout, connect_timeout=timeout, lighthouse_addr=lighthouse,
                               replica_id=f"torchmics_group_{replica_group}", init_sync=False)
        self._pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        self._in_step = False
        self.hop = ReplicaHop(units_of_params(state.units), self._all_reduce, lambda: state.in_no_replica_sync, model)

    def start_step(self) -> int:
        """Join this step's quorum (healing this group from a live one if it is behind); the step to train.

        Once per step: calling it again before :meth:`should_commit` returns the same step. A second
        quorum would wait for the other groups, which wait in this step's all-reduce for this one.
        """
        if not self._in_step:
            self.manager.start_quorum()
            self._in_step = True
        return self.manager.current_step()

    def should_commit(self) -> bool:
        """Whether every live group got through this step: step the optimizer only then (it advances the step)."""
        self._in_step = False
        return self.manager.should_commit()

    def participants(self) -> int:
        """How many replica groups the current step's gradients are averaged over."""
        return self.manager.num_participants()

    def resume_at(self, step: int) -> None:
        """Continue torchft's step counter from a checkpoint of ``step``."""
        self.manager.load_state_dict({"step": step, "batches_committed": 0})

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)

    def _all_reduce(self, u: int) -> None:
        """Start the replica all-reduce (mean over live groups) of unit ``u``'s gradient shards."""
        grads = [p.grad.to_local() for p in self.hop.params_per_unit[u] if p.grad is not None]
        if not grads:
            return
        with self.hop.side_stream():
            wire = pack(grads, sum(g.numel() for g in grads), self._dtype or grads[0].dtype)
            work = self.manager.allreduce(wire)
        if not self._pending:
            _fsdp.queue_after_backward(self._finish)
        self._pending.append((work, wire, grads))

    def _finish(self) -> None:
        """At the end of backward: wait for every replica all-reduce and write the means into the gradients.

        A failed all-reduce leaves garbage here but is recorded by the manager, so ``should_commit``
        says no and the gradients are discarded.
        """
        pending, self._pending = self._pending, []
        with self.hop.side_stream():
            for work, wire, grads in pending:
                work.wait()
                unpack(wire, grads)
        self.hop.wait()

    def _state_dict(self) -> dict[str, Any]:
        return heal_state(self.model, self.optimizer)

    def _load_state_dict(self, saved: dict[str, Any]) -> None:
        apply_heal_state(self.model, self.optimizer, saved)


def heal_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a rejoining group's same rank needs, as plain tensors: its shards, their optimizer state, and
    the buffers (running statistics, say, which training changes as it changes the weights)."""
    optim = optimizer.state_dict()
    sharded = {i: sorted(k for k, v in s.items() if isinstance(v, DTensor)) for i, s in optim["state"].items()}
    optim["state"] = {i: {k: _local(v) for k, v in s.items()} for i, s in optim["state"].items()}
    return {"model": {name: p.to_local() for name, p in model.named_parameters()},
            "buffers": {name: _local(b) for name, b in model.named_buffers()},
            "optimizer": optim, "sharded": sharded}


@torch.no_grad()
def apply_heal_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Make this rank's shards, buffers and optimizer state the ones :func:`heal_state` took from a live group."""
    for name, param in model.named_parameters():
        param.to_local().copy_(saved["model"][name])
    for name, buffer in model.named_buffers():
        _local(buffer).copy_(saved["buffers"][name])
    optimizer.load_state_dict(saved["optimizer"])
    params = optimizer.param_groups[0]["params"]
    for i, keys in saved["sharded"].items():
        param, state = params[i], optimizer.state[params[i]]
        for key in keys:
            state[key] = DTensor.from_local(state[key], param.device_mesh, param.placements,
                                            shape=param.shape, stride=param.stride())


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value
