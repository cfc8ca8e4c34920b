"""A compressed replica hop: gradients cross the slow network as int8 (or fp8) blocks with fp32 scales.

The replica hop is the traffic that crosses nodes (docs/design.md §7), so its bytes bound MiCS on
cloud links. Quantizing to one byte per element with one fp32 scale per block halves a bf16 hop.
A sum of quantized values is not a quantized value, so the hop cannot be an all-reduce of quantized
data: it is a reduce-scatter built from one all-to-all (each rank sends every rank the quantized
blocks of the chunk that rank owns), dequantized and averaged in fp32 by the owner; the plain optimizer
then all-gathers the re-quantized reduced chunks (ZeRO++'s qgZ has the same shape). The
replica-sharded optimizer needs only the first half: each rank steps on the chunk it owns.

**Error feedback** (EF-SGD, 1-bit Adam): what quantizing dropped from a rank's contribution is kept
and added to its next contribution, and what re-quantizing dropped from a reduced chunk is kept by
its owner and added to the next one. The applied gradients' running sum then trails the exact running
sum by one step's rounding at most, instead of drifting by the sum of all of them. The residuals are
fp32, as large as the rank's gradient shard (plus its owned chunk for the all-gather): the planner
counts them, and checkpoints keep them (:mod:`torchmics.checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from torchmics._fsdp import all_gather_single

_T = TypeVar("_T")
_LARGEST = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_SCALE_BYTES = 4  # one fp32 scale per block


@dataclass(frozen=True)
class Quantized:
    """A compressed replica-hop format: ``MixedPrecision(replica_reduce_dtype=Quantized())``.

    ``dtype``: ``torch.int8`` (rounded to the nearest of 255 levels per block) or
    ``torch.float8_e4m3fn`` (3 mantissa bits: a relative error instead of an absolute one).
    ``block_size`` elements share one fp32 scale (their largest magnitude maps to the format's
    largest value): smaller blocks follow the gradient's range more closely and send more scales.
    ``error_feedback`` carries each step's quantization error into the next step (see the module).
    """

    dtype: torch.dtype = torch.int8
    block_size: int = 256
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in _LARGEST:
            raise ValueError(f"Quantized(dtype=...) must be torch.int8 or torch.float8_e4m3fn, got {self.dtype}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"Quantized(block_size={self.block_size!r}): an int, since a block holds at least one element")

    @property
    def bytes_per_element(self) -> float:
        """What one gradient element costs on the wire, its share of the block's scale included."""
        return self.dtype.itemsize + _SCALE_BYTES / self.block_size

    def quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scales)`` of a flat fp32 tensor whose length is a multiple of ``block_size``."""
        blocks = values.view(-1, self.block_size)
        scales = blocks.abs().amax(dim=1) / _LARGEST[self.dtype]
        scaled = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)
        if self.dtype == torch.int8:
            scaled = scaled.round_().clamp_(-127, 127)
        return scaled.to(self.dtype).view(-1), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The fp32 values ``codes`` stand for: each block's codes times its scale."""
        return (codes.view(-1, self.block_size).float() * scales.unsqueeze(1)).view(-1)


def aligned_chunk(numel: int, replicas: int, block_size: int) -> int:
    """The chunk each replica rank owns of ``numel`` elements: whole blocks, so no block straddles two owners."""
    return max(1, math.ceil(numel / (replicas * block_size))) * block_size


def _compress(fmt: Quantized, values: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``values`` plus the residual they owe, quantized: ``(codes, scales, what quantizing dropped)``.

    A block holding an inf or NaN comes back non-finite (its scale is), so the step shows it and the
    loop can skip it; its residual must not become NaN with it (every later step would add it), so
    where the new residual is not finite the old one stays owed (zero where there was none).
    """
    values = values.float() if residual is None else values.float() + residual
    codes, scales = fmt.quantize(values)
    if not fmt.error_feedback:
        return codes, scales, None
    dropped = values - fmt.dequantize(codes, scales)
    kept = torch.zeros_like(dropped) if residual is None else residual
    return codes, scales, torch.where(dropped.isfinite(), dropped, kept)


def _dequantize_rows(fmt: Quantized, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One fp32 row per sender, from ``[senders, elements]`` codes and ``[senders, blocks]`` scales."""
    return fmt.dequantize(codes.reshape(-1), scales.reshape(-1)).view(codes.shape[0], -1)


_COMPILED: dict[Callable, Callable] = {}


def _fused(fn: Callable[..., _T], tensor: torch.Tensor) -> Callable[..., _T]:
    """``fn`` compiled into fused kernels for a GPU tensor, ``fn`` itself for a CPU one.

    Eager, quantizing is a dozen passes over the gradient; compiled, it runs 7x faster on an H200
    (0.50 vs 3.53 ms for 67M elements, benchmarks/results/h200-quantize-cost). On the CPU, where the
    tests run, compiling would cost more than it saves.
    """
    if tensor.device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)  # shapes go symbolic after the first recompile
    return _COMPILED[fn]


class QuantizedReplicaHop:
    """The compressed replica collectives of one model, with its error-feedback residuals per unit.

    Every unit's flat gradient has ``replicas * chunk`` elements (chunk: :func:`aligned_chunk`);
    replica rank ``r`` owns elements ``[r * chunk, (r + 1) * chunk)``.
    """

    def __init__(self, fmt: Quantized, group: dist.ProcessGroup) -> None:
        self.format, self.group = fmt, group
        self.replicas = group.size()
        self.sent_residuals: dict[int, torch.Tensor] = {}  # unit -> what its last contribution missed
        self.owned_residuals: dict[int, torch.Tensor] = {}  # unit -> what its last re-quantized chunk missed

    def reduce_scatter(self, unit: int, flat: torch.Tensor) -> torch.Tensor:
        """The replicas' mean of this rank's chunk of ``flat`` (fp32), each contribution quantized once."""
        codes, scales = self._compress(self.sent_residuals, unit, flat)
        received = self._exchange(codes, scales, all_to_all=True)
        return _fused(_dequantize_rows, flat)(self.format, *received).mean(dim=0)

    def all_gather(self, unit: int, reduced: torch.Tensor) -> torch.Tensor:
        """Every replica's reduced chunk, re-quantized by its owner: the same fp32 vector on every rank."""
        codes, scales = self._compress(self.owned_residuals, unit, reduced)
        received = self._exchange(codes, scales, all_to_all=False)
        return _fused(_dequantize_rows, reduced)(self.format, *received).view(-1)

    def _compress(self, residuals: dict[int, torch.Tensor], unit: int, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes, scales, dropped = _fused(_compress, values)(self.format, values, residuals.get(unit))
        if self.format.error_feedback:
            residuals[unit] = dropped
        return codes, scales

    def _exchange(self, codes: torch.Tensor, scales: torch.Tensor, all_to_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Send codes and scales as one byte buffer per peer; ``all_to_all``: row r to rank r, else all to all.

        Returns what arrived: ``[senders, elements]`` codes and ``[senders, blocks]`` scales. Bytes on the
        wire, not the formats' dtypes: gloo has no fp8, and one collective per exchange is one latency.
        """
        rows = self.replicas if all_to_all else 1
        code_bytes = codes.view(torch.uint8).view(rows, -1)
        send = torch.cat([code_bytes, scales.view(torch.uint8).view(rows, -1)], dim=1)
        received = torch.empty((self.replicas, send.shape[1]), dtype=torch.uint8, device=send.device)
        if all_to_all:
            dist.all_to_all_single(received, send, group=self.group)
        else:
            all_gather_single(received, send, group=self.group)
        width = code_bytes.shape[1]
        return (received[:, :width].contiguous().view(self.format.dtype),
                received[:, width:].contiguous().view(torch.float32))

    def state_dict(self) -> dict[str, dict[int, torch.Tensor]]:
        """This rank's residuals (unit -> tensor): what resuming needs to continue bit for bit."""
        return {"sent": dict(self.sent_residuals), "owned": dict(self.owned_residuals)}

    def load_state_dict(self, state: dict[str, dict[int, torch.Tensor]], device: torch.device) -> None:
        self.sent_residuals = {u: t.to(device) for u, t in state["sent"].items()}
        self.owned_residuals = {u: t.to(device) for u, t in state["owned"].items()}
