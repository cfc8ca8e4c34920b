"""What every benchmarked system shares: the run it is given (`BenchSpec`) and what it hands back (`Prepared`).

systems.py (torchmics, FSDP2, DDP, single) and deepspeed_peer.py (DeepSpeed) both build systems to this
contract, and the runner drives any of them the same way; keeping it here lets neither import the other.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn as nn

from torchmics.quantized import Quantized

LEARNING_RATE = 1e-4
SEED = 0  # every system starts from the same weights (torchmics.materialize: the same seed, the same model)


@dataclass(frozen=True)
class BenchSpec:
    """One system on one topology; what a results.jsonl line records besides the measurements."""

    system: str
    partition_size: int
    gpus_per_node: int
    reduce_dtype: torch.dtype
    param_dtype: torch.dtype
    replica_reduce_dtype: torch.dtype | Quantized | None = None  # precision per hop (torchmics only)


@dataclass
class Prepared:
    """A system ready to train: the wrapped model and how the runner drives a micro-step of it."""

    model: nn.Module
    sync: Callable[[bool], AbstractContextManager]  # is_last_micro_step -> context for that micro-step
    autocast: bool = False  # DDP keeps fp32 params and computes under bf16 autocast
    optimizer: torch.optim.Optimizer | None = None  # None: AdamW over model.parameters()
    backward: Callable[[torch.Tensor], None] | None = None  # None: loss.backward() (DeepSpeed has its own)
    clip_grad_norm: Callable[[float], torch.Tensor] | None = None  # None: torch.nn.utils.clip_grad_norm_
