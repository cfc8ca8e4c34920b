"""What compressing the replica hop costs on the device, without the network (issue 19).

For one unit's flat fp32 gradient of N elements on R = 2 replicas, the local work of
torchmics.quantized.QuantizedReplicaHop around its two collectives, with its own functions: add the
residual, quantize per block, keep the new residual, dequantize and average what arrives, then the same
for the owned chunk. The collectives are replaced by copies of the right size, so this is the compute a
real hop adds; eager, and compiled as the hop runs it on a GPU.
Timed with CUDA events after warm-up; prints milliseconds per hop and the input rate in GB/s, next to
what the bytes saved are worth on a 3.7 GB/s link (NCCL's socket transport between emulated nodes).

    python benchmarks/quantize_cost.py            # on a GPU; on a CPU it checks the script only
"""

from __future__ import annotations

import torch

from torchmics.quantized import Quantized
from torchmics.quantized import _compress as compress
from torchmics.quantized import _dequantize_rows as dequantize_rows

REPLICAS, LINK_GBPS = 2, 3.7
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def local_work(fmt: Quantized, flat: torch.Tensor, sent: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """The hop's device work for one unit (torchmics' own functions), the collectives standing in as copies."""
    codes, scales, _ = compress(fmt, flat, sent)
    chunk = dequantize_rows(fmt, codes.clone().view(REPLICAS, -1), scales.clone().view(REPLICAS, -1)).mean(dim=0)
    codes, scales, _ = compress(fmt, chunk, owned)
    return dequantize_rows(fmt, codes.repeat(REPLICAS, 1), scales.repeat(REPLICAS, 1)).view(-1)


def time_ms(fmt: Quantized, numel: int, compiled: bool, iterations: int = 20) -> float:
    flat = torch.randn(numel, device=DEVICE)
    sent, owned = torch.zeros_like(flat), torch.zeros(numel // REPLICAS, device=DEVICE)
    work = torch.compile(local_work) if compiled else local_work
    for _ in range(3):
        work(fmt, flat, sent, owned)
    if DEVICE != "cuda":
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        work(fmt, flat, sent, owned)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iterations


def compiled_matches_eager(fmt: Quantized, numel: int) -> str:
    """How the compiled kernels' codes compare with eager's on the same input (both within the format's bound)."""
    values = torch.randn(numel, device=DEVICE)
    eager = compress(fmt, values, None)
    fused = torch.compile(compress)(fmt, values, None)
    same = (eager[0].view(torch.uint8) == fused[0].view(torch.uint8)).float().mean().item()
    return f"{fmt.name}: {same:.6%} of codes identical, scales identical: {torch.equal(eager[1], fused[1])}"


def main() -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (no timing)"
    print(f"# quantized replica hop, device work per unit, {name}, torch {torch.__version__}\n")
    print("| format | mode | elements | ms per hop | input GB/s | link time saved vs bf16 at 3.7 GB/s, ms |")
    print("|---|---|---|---|---|---|")
    numel = 2**26 if DEVICE == "cuda" else 2**14  # 67M elements: one 1.4b block is 50M
    for dtype in (torch.int8, torch.float8_e4m3fn):
        fmt = Quantized(dtype)
        per_half = (REPLICAS - 1) / REPLICAS * numel  # elements one rank sends in each half of the hop
        saved_ms = 2 * per_half * (2 - fmt.bytes_per_element) / (LINK_GBPS * 1e9) * 1e3
        for compiled in (False, True):
            ms = time_ms(fmt, numel, compiled)
            mode = "compiled" if compiled else "eager"
            print(f"| {fmt.name} | {mode} | {numel:,} | {ms:.2f} | {numel * 4 / ms / 1e6:.0f} | {saved_ms:.1f} |")
    print()
    for dtype in (torch.int8, torch.float8_e4m3fn):
        print(compiled_matches_eager(Quantized(dtype), numel))


if __name__ == "__main__":
    main()
