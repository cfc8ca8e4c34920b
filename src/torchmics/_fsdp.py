"""Every way torchmics reaches past FSDP2's public API, in one place, checked against one tested range of torch.

torchmics builds MiCS on FSDP2 from outside, and seven of the things it needs are not public contracts:

1. Custom collectives subclass ``torch.distributed.fsdp._fully_shard._fsdp_api.AllGather`` /
   ``ReduceScatter`` (what ``set_custom_all_gather`` / ``set_custom_reduce_scatter`` take), and FSDP2
   treats a returned ``None`` as "finished on the current stream" (it waits only on a returned ``Work``).
2. The replica hop (:mod:`torchmics.replica`) runs from each *sharded* parameter's post-accumulate-grad
   hooks, which FSDP2 calls itself, on its post-reduce stream, once ``.grad`` holds the partition-reduced
   gradient (the sharded parameters are not in the autograd graph, so autograd never would).
3. The end of that backward is found with autograd engine callbacks, as FSDP2 finds its own: one queued
   during backward runs after FSDP2's (queued at its first pre-backward), and one queued from inside a
   callback runs after every callback queued during backward. Compiled autograd does not run such
   callbacks the same way, so the replica hop refuses to run under it.
4. Activation checkpointing of the training command wraps blocks with
   ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper``, which FSDP2 composes with.
5. The tensor collectives are called by their current names (``all_gather_single``,
   ``reduce_scatter_single`` from torch 2.13 on, whose old names warn on every rank).
6. A unit whose partition group is one rank skips two copies FSDP2 makes at world size 1
   (:func:`skip_single_rank_copies`): its unshard replaces ``FSDPParamGroup.wait_for_unshard`` on that
   group, and its reduce-scatter's ``allocate`` hands FSDP2 the input buffer again as the output.
7. Whether FSDP2's own (HSDP) replica all-reduce still owes a unit's gradients, because every backward
   since it last ran deferred it, is read off the unit's ``_partial_reduce_output``
   (:func:`replica_reduction_pending`).

Each of these was tested on torch ``OLDEST_TORCH`` to ``NEWEST_TESTED_TORCH`` (pyproject.toml's minimum to
the release CI runs). Importing torchmics on another torch is an error, because a change in any of them
fails silently (a replica hop never run, a collective not waited for, a gradient buffer aliased), unless the
environment variable ``TORCHMICS_ALLOW_UNTESTED_TORCH=1`` says to try; :class:`torchmics.replica.ReplicaHop`
then still checks at run time that FSDP2 called its hooks.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

OLDEST_TORCH = (2, 10)  # pyproject.toml's "torch>=2.10" (tests/test_fsdp.py checks that they agree)
NEWEST_TESTED_TORCH = (2, 13)
ALLOW_UNTESTED_ENV = "TORCHMICS_ALLOW_UNTESTED_TORCH"


class UntestedTorchError(ImportError):
    """torchmics was imported with a torch outside the range its FSDP2 internals were tested on."""


def tested_range() -> str:
    """The torch releases torchmics was tested on, as a reader writes them: ``2.10 to 2.13``."""
    return f"{'.'.join(map(str, OLDEST_TORCH))} to {'.'.join(map(str, NEWEST_TESTED_TORCH))}"


def check_torch_version(version: str) -> None:
    """Raise :class:`UntestedTorchError` unless ``version`` is in the tested range or the user opted in."""
    found = re.match(r"(\d+)\.(\d+)", version)
    release = (int(found[1]), int(found[2])) if found else None
    if release is not None and OLDEST_TORCH <= release <= NEWEST_TESTED_TORCH:
        return
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    raise UntestedTorchError(
        f"torchmics relies on FSDP2 internals tested on torch {tested_range()}, but this is torch {version}. "
        f"Install a tested release (pip install 'torch>={'.'.join(map(str, OLDEST_TORCH))},"
        f"<{NEWEST_TESTED_TORCH[0]}.{NEWEST_TESTED_TORCH[1] + 1}'), or set {ALLOW_UNTESTED_ENV}=1 to try this one "
        "(torchmics then still checks at run time that FSDP2 calls its gradient hooks)."
    )


check_torch_version(torch.__version__)

# 1. Custom collectives: the base classes, and what a collective that ran synchronously returns.
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter  # noqa: E402

COMPLETED_ON_CURRENT_STREAM = None  # FSDP2 waits on a returned Work; None means the output is ready in stream order

# 5. The tensor collectives by their current names (2.13 renamed them and warns for the old ones), looked
# up on every call so that wrappers of torch.distributed's functions (tests/traffic.py) see them.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None,
                      async_op: bool = False) -> dist.Work | None:
    """Every rank's ``input`` end to end in ``output`` (``torch.distributed.all_gather_single``)."""
    return getattr(dist, ALL_GATHER)(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
                          group: dist.ProcessGroup | None = None, async_op: bool = False) -> dist.Work | None:
    """This rank's chunk of ``input`` reduced over the group (``torch.distributed.reduce_scatter_single``)."""
    return getattr(dist, REDUCE_SCATTER)(output, input, op=op, group=group, async_op=async_op)


def register_gradient_hook(param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> None:
    """2. Call ``hook(param)`` each time FSDP2 has put a partition-reduced gradient into sharded ``param.grad``.

    FSDP2 calls the hooks on its post-reduce stream, accumulated over micro-steps in ``.grad``.
    """
    param.register_post_accumulate_grad_hook(hook)


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """3. Run ``callback`` when the running backward has finished (after FSDP2's own end-of-backward work)."""
    if compiled_autograd_active():
        raise RuntimeError(
            "torchmics runs this model's replica hop itself (a replica_reduce_dtype, or optimizer states sharded "
            "over replicas) and finds the end of backward with an autograd callback, which compiled autograd "
            "does not run; turn compiled autograd off for this model (torch._dynamo.config.compiled_autograd = "
            "False), or shard without those options so that FSDP2 runs the replica all-reduce."
        )
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def queue_after_backward(callback: Callable[[], None]) -> None:
    """3. Run ``callback`` after the running backward and every end-of-backward callback queued during it.

    Callable from early in backward (before FSDP2 queued its own callback): the callback queued now only
    queues ``callback``, which the engine then runs after everything already queued.
    """
    queue_end_of_backward(lambda: queue_end_of_backward(callback))


def compiled_autograd_active() -> bool:
    """Whether compiled autograd is on (it can only be once ``torch._dynamo`` was imported: not imported here)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(ca.compiled_autograd_enabled or ca.in_compiled_autograd_region)


def checkpoint_wrapper(module: nn.Module) -> nn.Module:
    """4. ``module`` recomputing its activations in backward, in the wrapper FSDP2 composes with."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module)


class _AliasedReduceScatter(ReduceScatter):
    """6b. At world size 1, a reduce-scatter whose output is its input: the second of two same-sized buffers
    FSDP2 allocates in a row (input, then output) is the first one, so its ``output.copy_(input)`` is a no-op.

    FSDP2 never calls a custom reduce-scatter at world size 1 (it copies instead), only ``allocate``.
    """

    def __init__(self) -> None:
        self._unpaired: torch.Tensor | None = None

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pending, self._unpaired = self._unpaired, None
        if pending is not None and pending.shape == torch.Size(size) and pending.dtype == dtype:
            if pending.is_cuda:  # allocated on the compute stream, read as the output on this (reduce-scatter) one
                pending.record_stream(torch.cuda.current_stream(pending.device))
            return pending
        self._unpaired = torch.empty(size, dtype=dtype, device=device)
        return self._unpaired

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        raise RuntimeError("torchmics' single-rank reduce-scatter is only for a partition group of one rank")


def skip_single_rank_copies(unit: nn.Module) -> None:
    """6. Take out the copies FSDP2 makes of ``unit``'s parameters and gradients when its partition group is one rank.

    At world size 1 FSDP2's unshard casts every sharded parameter into a fresh tensor and copies that into
    the unsharded buffer, one parameter at a time (6a), and its reduce-scatter copies the flat gradient
    buffer into a second one (6b). Here the parameters are cast-copied straight into their unsharded
    buffers in one ``torch._foreach_copy_``, and the gradient buffer is the reduce-scatter's output: the
    same values, half the memory traffic and none of the per-parameter host work. Units it does not
    apply to keep FSDP2's path: a group of several ranks, CPU offload, tensor subclasses with their own
    all-gather (``fsdp_pre_all_gather``).
    """
    from torch.distributed.fsdp._fully_shard._fsdp_param import alloc_storage

    group = unit._get_fsdp_state()._fsdp_param_group
    if group is None or group._all_gather_process_group.size() != 1:
        return
    if any(p.offload_to_cpu or hasattr(p._sharded_local_tensor, "fsdp_pre_all_gather") for p in group.fsdp_params):
        return

    def wait_for_unshard() -> None:  # FSDP2's world-size-1 branch, with the copies done in one foreach
        if not group._all_gather_result:
            return  # no preceding unshard
        params = group.fsdp_params
        for p in params:
            p.init_all_gather_outputs([p._sharded_param_data.numel()], [p.param_dtype or p.orig_dtype], 1, group.device)
            alloc_storage(p.all_gather_outputs[0])
        outputs = tuple(p.all_gather_outputs[0] for p in params)
        with torch.autograd._unsafe_preserve_version_counter(outputs):
            torch._foreach_copy_(outputs, [p._sharded_param_data for p in params])
        for p in params:
            p.init_unsharded_param()
        group._to_unsharded()
        copied = group.device_handle.Event()
        copied.record()
        group._wait_all_gather_streams_on_event(copied)
        group._all_gather_result = None

    group.wait_for_unshard = wait_for_unshard
    unit.set_custom_reduce_scatter(_AliasedReduceScatter())


def replica_reduction_pending(unit: nn.Module) -> bool:
    """7. Whether ``unit`` holds gradients FSDP2 reduce-scattered but has not yet all-reduced across replicas."""
    group = unit._get_fsdp_state()._fsdp_param_group
    return group is not None and group._partial_reduce_output is not None


__all__ = [
    "ALLOW_UNTESTED_ENV",
    "ALL_GATHER",
    "REDUCE_SCATTER",
    "COMPLETED_ON_CURRENT_STREAM",
    "NEWEST_TESTED_TORCH",
    "OLDEST_TORCH",
    "AllGather",
    "ReduceScatter",
    "UntestedTorchError",
    "all_gather_single",
    "check_torch_version",
    "checkpoint_wrapper",
    "compiled_autograd_active",
    "queue_after_backward",
    "queue_end_of_backward",
    "reduce_scatter_single",
    "register_gradient_hook",
    "replica_reduction_pending",
    "skip_single_rank_copies",
    "tested_range",
]
