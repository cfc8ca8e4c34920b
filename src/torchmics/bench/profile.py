"""Where a benchmark step's time goes: ``torchmics bench --profile``.

One extra step after the timed ones runs under ``torch.profiler`` on rank 0. Summed kernel times
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
    out_prefix.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30))
    prof.export_chrome_trace(str(out_prefix.with_suffix(".json.gz")))
    summary = {"profiled_step_s": wall}
    if cuda:
        compute, comm = _kernel_seconds(prof)
        summary |= {"compute_s": compute, "comm_s": comm, "exposed_s": max(0.0, wall - compute)}
    return summary


def _kernel_seconds(prof: profile) -> tuple[float, float]:
    """Summed device time of compute kernels and of NCCL kernels (GPU-side annotations left out)."""
    compute = comm = 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        seconds = event.time_range.elapsed_us() / 1e6
        if "nccl" in event.name.lower():
            comm += seconds
        else:
            compute += seconds
    return compute, comm
