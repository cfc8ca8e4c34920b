"""Peak dense bf16 FLOP/s per accelerator: the denominator of every MFU that train and bench print.

One table for both, so that `torchmics train` and `torchmics bench` report the same MFU for the same
speed. Figures are the vendors' datasheet values for dense (not 2:4 sparse) bf16 tensor-core math;
a device not listed has no MFU (None) rather than a guessed one.
"""

from __future__ import annotations

import torch

# Checked in order, so more specific names come before the names they contain ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
)


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name (``torch.cuda.get_device_name``), or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(name: str) -> float | None:
    """Dense bf16 peak of the device called ``name``; None for devices without a datasheet entry (and CPUs)."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak (None without a peak)."""
    return tokens_per_s_per_device * flops_per_token / peak if peak else None
