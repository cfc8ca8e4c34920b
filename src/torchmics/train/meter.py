"""Honest throughput without a host sync per step, and a stop at the first non-finite step.

A GPU runs a step long after the host has queued it, so a clock read when the host is done measures
how fast Python queues kernels (issue 14: 1.53x the real speed). Waiting for the device after every
step would be honest but drains the queue each time. So, as nanoGPT and torchtitan do, the loop keeps
each step's loss and gradient norm as device tensors and `StepMeter.read` waits for the device once
per log interval: the clock stops after the device finished the interval's work, and every step of
the interval gets the interval's mean step time. Records stay per step (the loss curve keeps its
resolution); their time fields are interval averages.

Without a sync per step a non-finite value is seen at the end of its interval, so with the default
``max_skipped_steps=0`` the run stops there, naming the first bad step; the interval also ends before
every checkpoint, so a diverged model is never saved. ``max_skipped_steps > 0`` reads each step's
(global) gradient norm at once, one sync per step, to skip the optimizer update of a non-finite step.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torchmics import hardware


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite (more often than ``--max-skipped-steps`` allows)."""


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class _Step:
    step: int
    lr: float
    loss: torch.Tensor  # this rank's mean loss, on the device
    grad_norm: torch.Tensor  # global, on the device
    skipped: bool


class StepMeter:
    """Collects the steps of one log interval on the device; `read` ends the interval with one sync.

    ``tokens_per_step`` counts every rank's tokens; MFU uses ``flops_per_token`` (the count bench and
    the planner use) and the device's peak from :mod:`torchmics.hardware` (None where unknown).
    """

    def __init__(self, device: torch.device, tokens_per_step: int, flops_per_token: int) -> None:
        self.device, self.tokens_per_step, self.flops_per_token = device, tokens_per_step, flops_per_token
        self.peak_flops = hardware.peak_flops(hardware.device_name(device))
        self._steps: list[_Step] = []
        self._began = time.perf_counter()

    def restart(self) -> None:
        """Start the next interval's clock now, once the device is idle: what ran since is not training time."""
        _synchronize(self.device)
        self._began = time.perf_counter()

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: bool = False) -> None:
        """Note a finished optimizer step (1-based ``step``) without reading anything from the device."""
        self._steps.append(_Step(step, lr, loss.detach(), grad_norm.detach(), skipped))

    def read(self) -> list[dict]:
        """End the interval: average losses over ranks, wait for the device, return one record per step."""
        steps, self._steps = self._steps, []
        if not steps:
            return []
        losses = torch.stack([s.loss for s in steps]).float()
        dist.all_reduce(losses)  # one collective per interval, not per step
        norms = torch.stack([s.grad_norm for s in steps]).float().to(losses.device)  # on the host with --cpu-offload
        values = torch.stack([losses / dist.get_world_size(), norms])
        _synchronize(self.device)  # every queued step is done: the clock may stop
        now = time.perf_counter()
        step_time = (now - self._began) / len(steps)
        self._began = now
        losses_read, norms_read = values.tolist()
        tokens_per_s = self.tokens_per_step / step_time
        per_gpu = tokens_per_s / dist.get_world_size()
        timing = {
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": per_gpu,
            "mfu": hardware.mfu(per_gpu, self.flops_per_token, self.peak_flops),
            "peak_mem_bytes": peak_memory_bytes(self.device),
        }
        return [{"step": s.step, "loss": loss, "lr": s.lr, "grad_norm": norm, **timing} | ({"skipped": True} if s.skipped else {})
                for s, loss, norm in zip(steps, losses_read, norms_read)]


class NonFiniteGuard:
    """Decides which steps are skipped and when a run has diverged (see the module docstring)."""

    def __init__(self, max_skipped_steps: int) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        """More steps in a row were non-finite than may be skipped: the run must stop now."""
        return self.in_a_row > self.max_skipped_steps

    def skips(self, grad_norm: torch.Tensor) -> bool:
        """Whether to skip this step's optimizer update; reads ``grad_norm`` only if skipping is allowed."""
        if self.max_skipped_steps == 0:
            return False
        finite = math.isfinite(grad_norm.item())
        self.in_a_row = 0 if finite else self.in_a_row + 1
        return not finite

    def problem(self, records: list[dict]) -> str | None:
        """The one-line reason to stop, from an interval's records, or None to go on."""
        for r in records:
            if not r.get("skipped") and not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])):
                return (f"training diverged at step {r['step']}: loss {r['loss']}, gradient norm {r['grad_norm']} "
                        f"(lr {r['lr']:.2e}); lower --lr, or let --max-skipped-steps N skip such steps")
        if self.exhausted and records:
            last = records[-1]
            return (f"training diverged at step {last['step']}: gradient norm {last['grad_norm']} in {self.in_a_row} "
                    f"steps in a row, more than --max-skipped-steps {self.max_skipped_steps} (lr {last['lr']:.2e}); "
                    "lower --lr or restart from a checkpoint")
        return None
