"""DeepSpeed's ZeRO-3 and MiCS as `torchmics bench` peers (docs/design.md §7).

MiCS first shipped inside DeepSpeed as a subclass of its ZeRO-3: ``MiCS_Init`` partitions each
parameter over a group of ``mics_shard_size`` ranks instead of the whole world, and ``MiCS_Optimizer``
all-reduces the gradient shards across the replicas at the accumulation boundary. DeepSpeed removed it
in 0.19, so 0.18.9 is the version to compare with. A GPU machine without internet gets it as wheels
(``benchmarks/deepspeed_smoke.sh``); where DeepSpeed is not installed ``DEEPSPEED_SYSTEMS`` is empty and
``DEEPSPEED_UNAVAILABLE`` says why. Only the package's presence is checked at import: importing
DeepSpeed itself is slow and noisy, so it happens in the benchmark's worker processes.

The runner builds the plain model before a system sees it. DeepSpeed handles that itself: an engine
given parameters that are not ZeRO parameters yet converts them while it builds its optimizer
(``MiCS_Offload`` calls ``MiCS_Init(module=model)``, ZeRO-3 calls ``zero.Init(module=model)``), so no
``with MiCS_Init(...)`` around the model's construction is needed. Each rank holds the whole model on
its GPU (in bf16) for a moment before it is partitioned; FSDP2 and torchmics shard a built model too.

DeepSpeed owns backward and the optimizer step, so the ``Prepared`` carries ``engine.backward`` and
an optimizer whose ``step`` is ``engine.step``. The runner keeps the accumulation, as for every other
system: it divides the loss by its accumulation count and tells the engine which micro-step is the
last (``sync``), so the engine's own ``gradient_accumulation_steps`` stays 1 and only feeds
DeepSpeed's batch-size bookkeeping.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn as nn

from torchmics.bench.spec import LEARNING_RATE, SEED, BenchSpec, Prepared
from torchmics.dtypes import dtype_name
from torchmics.materialize import materialize
from torchmics.topology import current_device
from torchmics.wrapping import resolve_units


def _unavailable() -> str | None:
    """Why the DeepSpeed peers are not offered here, or None when they are."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return "DeepSpeed peers skipped: deepspeed is not installed (they need 0.18.9, the last release with MiCS)"
    if tuple(int(part) for part in version.split(".")[:2]) >= (0, 19):
        return f"DeepSpeed peers skipped: deepspeed {version} has no MiCS (removed in 0.19; install 0.18.9)"
    return None


DEEPSPEED_UNAVAILABLE = _unavailable()


def ds_config(spec: BenchSpec, unit_numel: int, mics_shard_size: int | None = None, hierarchical: bool = False) -> dict:
    """The DeepSpeed config of one peer: ZeRO-3, or MiCS when ``mics_shard_size`` is given.

    Buckets hold one sharding unit (a transformer block), so DeepSpeed prefetches and reduce-scatters
    at the granularity FSDP2 gathers and reduces. Every gradient collective runs in ``reduce_dtype``,
    like FSDP2's ``MixedPrecisionPolicy(reduce_dtype=...)``: ``communication_data_type`` sets ZeRO-3's
    reduce-scatter, and the accumulation dtype sets MiCS' replica all-reduce, which DeepSpeed runs on
    the accumulated gradient shards in that dtype.
    """
    accumulate_fp32 = torch.float32 in (spec.param_dtype, spec.reduce_dtype)
    zero = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": unit_numel,
        "stage3_prefetch_bucket_size": unit_numel,
    }
    if mics_shard_size is not None:
        zero |= {"mics_shard_size": mics_shard_size, "mics_hierarchical_params_gather": hierarchical}
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the runner feeds the batches
        "gradient_accumulation_steps": 1,  # the runner accumulates and sets the boundary itself
        "bf16": {"enabled": spec.param_dtype == torch.bfloat16},
        "communication_data_type": dtype_name(spec.reduce_dtype),
        "data_types": {"grad_accum_dtype": "fp32" if accumulate_fp32 else "bf16"},
        "zero_optimization": zero,
    }


def _largest_unit_numel(model: nn.Module) -> int:
    return max(sum(p.numel() for p in unit.parameters()) for unit in resolve_units(model, None) or [model])


def _engine(spec: BenchSpec, model: nn.Module, config: dict) -> Prepared:
    import deepspeed  # slow to import; only the benchmark's workers need it

    materialize(model, current_device(), SEED)  # DeepSpeed partitions a whole model (see the module docstring)
    engine, *_ = deepspeed.initialize(
        model=model,
        # torch's AdamW, as the other systems get (DeepSpeed's FusedAdam needs its compiled ops).
        optimizer=lambda params: torch.optim.AdamW(params, lr=LEARNING_RATE, fused=torch.cuda.is_available()),
        config=config,
    )

    def sync(is_last: bool) -> AbstractContextManager:
        engine.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)  # the runner already divided the loss by its accumulation count

    return Prepared(engine, sync, optimizer=_EngineStep(engine), backward=backward)


class _EngineStep:
    """The runner's optimizer for a DeepSpeed engine: ``engine.step()`` updates, then clears the gradients."""

    def __init__(self, engine: nn.Module) -> None:
        self.engine = engine

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # engine.step() did, at the accumulation boundary that sync() set


def _zero3(spec: BenchSpec, model: nn.Module) -> Prepared:
    return _engine(spec, model, ds_config(spec, _largest_unit_numel(model)))


def _mics(spec: BenchSpec, model: nn.Module, flat: bool) -> Prepared:
    """DeepSpeed MiCS over torchmics' partition groups (consecutive ranks, ``partition_size`` each).

    Unless ``flat``, parameters are gathered in two steps (inter-node, then intra-node) where that
    applies, as ``torchmics.shard(hierarchical="auto")`` does: when a partition group spans nodes of
    more than one GPU each. DeepSpeed refuses the two-step gather inside one node.
    """
    # DeepSpeed counts a node's GPUs with device_count(), which on a host running emulated nodes is
    # every GPU of the host; NDEV_PER_NODE overrides it and so places the node borders.
    os.environ["NDEV_PER_NODE"] = str(spec.gpus_per_node)
    hierarchical = not flat and spec.partition_size > spec.gpus_per_node > 1
    return _engine(spec, model, ds_config(spec, _largest_unit_numel(model), spec.partition_size, hierarchical))


DEEPSPEED_SYSTEMS: dict[str, Callable[[BenchSpec, nn.Module], Prepared]] = {} if DEEPSPEED_UNAVAILABLE else {
    "deepspeed-zero3": _zero3,
    "deepspeed-mics": lambda spec, model: _mics(spec, model, flat=False),
    "deepspeed-mics-flat": lambda spec, model: _mics(spec, model, flat=True),
}
