"""The systems `torchmics bench` compares, each prepared from the same plain model.

Every system returns a `Prepared`: the wrapped model and how a micro-step is synchronized. The
benchmark loop is then identical for all of them, so differences in the numbers are differences
in the sharding runtime, not in the harness.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import torchmics
from torchmics.bench.deepspeed_peer import DEEPSPEED_SYSTEMS
from torchmics.bench.spec import LEARNING_RATE, SEED, BenchSpec, Prepared
from torchmics.materialize import materialize
from torchmics.topology import current_device
from torchmics.wrapping import resolve_units


def _always_sync(is_last: bool) -> AbstractContextManager:
    return contextlib.nullcontext()


def _torchmics(spec: BenchSpec, model: nn.Module, hierarchical, two_hop: bool, optimizer_over_replicas: bool = False) -> Prepared:
    topo = torchmics.init_mesh(partition_size=spec.partition_size, gpus_per_node=spec.gpus_per_node)
    mp = torchmics.MixedPrecision(spec.param_dtype, spec.reduce_dtype, spec.replica_reduce_dtype)
    model = torchmics.shard(model, topo, mixed_precision=mp, hierarchical=hierarchical,
                            shard_optimizer_across_replicas=optimizer_over_replicas, init_seed=SEED,
                            reshard_after_forward=reshards_after_forward(spec))
    optimizer = None
    if optimizer_over_replicas:
        fused = torch.cuda.is_available()
        optimizer = torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=LEARNING_RATE, fused=fused)

    def sync(is_last: bool) -> AbstractContextManager:
        return contextlib.nullcontext() if is_last or not two_hop else torchmics.no_replica_sync(model)

    return Prepared(model, sync, optimizer=optimizer, clip_grad_norm=lambda max_norm: torchmics.clip_grad_norm_(model, max_norm))


def reshards_after_forward(spec: BenchSpec) -> bool | None:
    """Whether the system's units are resharded after forward (None: not an FSDP2 system). torchmics keeps
    them gathered at P = 1, as train does where the copy fits; plain FSDP2 reshards its units."""
    if spec.system.startswith("torchmics"):
        return spec.partition_size > 1
    return True if spec.system.startswith("fsdp2") else None


def _fsdp2(spec: BenchSpec, model: nn.Module, hsdp: bool) -> Prepared:
    """Plain FSDP2, as a user would write it: full shard over the world, or HSDP with two-hop."""
    world = dist.get_world_size()
    shape, names = ((world // spec.partition_size, spec.partition_size), ("replicate", "shard")) if hsdp else ((world,), ("shard",))
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", shape, mesh_dim_names=names)
    policy = MixedPrecisionPolicy(param_dtype=spec.param_dtype, reduce_dtype=spec.reduce_dtype)
    units = resolve_units(model, None)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    materialize(model, current_device(), SEED, [*units, model])  # FSDP2's own meta-device recipe, torchmics' init

    def sync(is_last: bool) -> AbstractContextManager:
        model.set_requires_all_reduce(is_last or not hsdp)
        return contextlib.nullcontext()

    return Prepared(model, sync)


def _ddp(spec: BenchSpec, model: nn.Module) -> Prepared:
    """DDP all-reduces every micro-step (no ``no_sync``), the docs/design.md §7 baseline."""
    from torch.nn.parallel import DistributedDataParallel

    device = current_device()
    materialize(model, device, SEED)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if spec.reduce_dtype == torch.bfloat16:
        ddp.register_comm_hook(dist.group.WORLD, _bf16_all_reduce)
    return Prepared(ddp, _always_sync, autocast=spec.param_dtype != torch.float32)


def _single(spec: BenchSpec, model: nn.Module) -> Prepared:
    """The plain single-GPU loop every sharded system is measured against (torch.compile's reference too).

    No sharding and no hooks: fp32 weights, bf16 autocast (with ``--param-dtype bf16``), AdamW over
    the parameters, as a user trains a model that fits one GPU.
    """
    if dist.get_world_size() != 1:
        raise ValueError(f"the single system runs on one GPU, not {dist.get_world_size()}; bench it with --nproc 1")
    materialize(model, current_device(), SEED)
    return Prepared(model, _always_sync, autocast=spec.param_dtype != torch.float32)


def _bf16_all_reduce(group, bucket):  # unannotated: DDP checks the hook's annotations at run time
    """DDP's gradient all-reduce in bf16 (torch's own bf16 hook refuses gloo, so CPU runs use this one)."""
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())
    work = dist.all_reduce(compressed, group=group, async_op=True)
    return work.get_future().then(lambda fut: bucket.buffer().copy_(fut.value()[0]))


SINGLE_DEVICE_SYSTEMS = ("single",)  # run only with --nproc 1
# Earlier names, still accepted by --systems (and read in committed results by torchmics.plan.records).
RENAMED_SYSTEMS = {"torchmics-replica-optimizer": "torchmics-optimizer-over-replicas"}
SYSTEMS: dict[str, Callable[[BenchSpec, nn.Module], Prepared]] = {
    "torchmics": lambda spec, model: _torchmics(spec, model, "auto", two_hop=True),
    "torchmics-flat": lambda spec, model: _torchmics(spec, model, False, two_hop=True),
    "torchmics-no-two-hop": lambda spec, model: _torchmics(spec, model, "auto", two_hop=False),
    "torchmics-optimizer-over-replicas": lambda spec, model: _torchmics(spec, model, "auto", True, optimizer_over_replicas=True),
    "fsdp2-full": lambda spec, model: _fsdp2(spec, model, hsdp=False),
    "fsdp2-hsdp": lambda spec, model: _fsdp2(spec, model, hsdp=True),
    "ddp": _ddp,
    "single": _single,
    **DEEPSPEED_SYSTEMS,
}
