"""Where a benchmark step's time goes: ``torchmics bench --profile``.

One extra step after the timed ones runs under ``torch.profiler`` on rank 0. Kernel busy times
split the step into compute and communication (NCCL kernels); what the compute kernels do not
cover of the step's wall time is the *exposed* time, communication that no compute hides (plus
launch gaps), which is what overlap, prefetching and bf16 communication can win back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def profile_step(run_step: Callable[[], None], out_prefix: Path) -> dict:
    """Run ``run_step`` once under the profiler; write ``<prefix>.txt`` and ``<prefix>.json.gz`` (trace)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        run_step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=80))
    prof.export_chrome_trace(str(out_prefix.with_suffix(".json.gz")))
    summary = {"profiled_step_s": wall}
    if cuda:
        compute, comm = _kernel_seconds(prof)
        summary |= {"compute_s": compute, "comm_s": comm, "exposed_s": max(0.0, wall - compute)}
    return summary


def _kernel_seconds(prof: profile) -> tuple[float, float]:
    """Busy time of compute kernels and of NCCL kernels (GPU-side annotations left out).

    Each is the union of its kernels' intervals over all streams, so kernels that overlap one another
    (FSDP2's copies next to a matmul) are not counted twice.
    """
    compute, comm = [], []
    for event in prof.events():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        interval = (event.time_range.start, event.time_range.end)
        (comm if "nccl" in event.name.lower() else compute).append(interval)
    return _union_us(compute) / 1e6, _union_us(comm) / 1e6


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``[start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
