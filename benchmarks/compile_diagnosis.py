"""Why per-block torch.compile gains less under FSDP2 than without it (issue 14), on one GPU.

A GPT with the 1.4b preset's block shape (d_model 2048, 16 heads, seq 2048, micro-batch 4) but few
blocks, one process, world size 1. It prints, for the same forward + backward (no optimizer):

- device milliseconds per iteration (CUDA events over 20 iterations) of the plain model (fp32
  weights, bf16 autocast) and of torchmics' sharded one (bf16 parameters, fp32 reduction, as train
  runs it), each eager and compiled, and sharded without resharding after forward (FSDP2 at world
  size 1 copies every unit's parameters into the gathered buffer on the compute stream, once per
  forward and again per backward when it reshards);
- host milliseconds to queue one iteration (a host-bound loop has host >= device);
- torch._dynamo.explain of one sharded block: graphs, graph breaks and their reasons;
- dynamo's counters (frames, recompiles, graph breaks) after the compiled runs.

Usage: python benchmarks/compile_diagnosis.py [n_layer] [d_model]   (with TORCH_LOGS=graph_breaks,recompiles to see
each; on a machine without a GPU it runs on the CPU, a check of the script rather than a measurement)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
import torch._dynamo

import torchmics
from torchmics.models import GPT, GPTConfig, causal_lm_loss
from torchmics.wrapping import compile_units

ITERATIONS, WARMUP = 20, 3
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SEQ = 2048 if CUDA else 32


def _model(n_layer: int, d_model: int) -> GPT:
    cfg = GPTConfig(n_layer=n_layer, n_head=16, d_model=d_model, seq_len=SEQ, vocab_size=50304, tie_embeddings=False)
    with torch.device(DEVICE):
        return GPT(cfg)


def _synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _time(model: torch.nn.Module, autocast: bool, fused_loss: bool) -> tuple[float, float]:
    """(device ms, host ms) per forward + backward, averaged over ITERATIONS after WARMUP."""
    tokens = torch.randint(0, 50304, (4, SEQ + 1), device=DEVICE)
    amp = torch.autocast(DEVICE, torch.bfloat16) if autocast else contextlib.nullcontext()

    def iteration() -> None:
        with amp:
            causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:], fused=fused_loss).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        iteration()
    _synchronize()
    began_all = time.perf_counter()
    host = 0.0
    for _ in range(ITERATIONS):
        began = time.perf_counter()
        iteration()
        host += time.perf_counter() - began
    _synchronize()  # device time: from the first launch until the device finished the last iteration
    return 1e3 * (time.perf_counter() - began_all) / ITERATIONS, 1e3 * host / ITERATIONS


def _sharded(model: GPT, reshard: bool = True) -> GPT:
    topo = _sharded.topo = getattr(_sharded, "topo", None) or torchmics.init_mesh(partition_size=1, gpus_per_node=1)
    mp = torchmics.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return torchmics.shard(model, topo, mixed_precision=mp, reshard_after_forward=reshard)


def _variant(name: str, shape: tuple[int, int], sharded: bool, compiled: bool, reshard: bool = True) -> None:
    torch._dynamo.reset()
    model = _model(*shape)
    if compiled:
        compile_units(model)
    if sharded:
        model = _sharded(model, reshard)
    device_ms, host_ms = _time(model, autocast=not sharded, fused_loss=compiled)
    print(f"{name:<52} {device_ms:8.2f} ms per iteration, host {host_ms:8.2f} ms to queue it", flush=True)


def main() -> None:
    shape = (int(sys.argv[1]) if len(sys.argv) > 1 else 4, int(sys.argv[2]) if len(sys.argv) > 2 else 2048)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    if CUDA:
        torch.cuda.set_device(0)
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    print(f"{shape[0]} blocks, d_model {shape[1]}, micro-batch 4 x {SEQ} tokens, {name}, torch {torch.__version__}")
    _variant("plain, eager (fp32 weights, bf16 autocast)", shape, sharded=False, compiled=False)
    _variant("plain, compiled blocks + fused loss", shape, sharded=False, compiled=True)
    _variant("torchmics P=1, eager", shape, sharded=True, compiled=False)
    _variant("torchmics P=1, compiled blocks + fused loss", shape, sharded=True, compiled=True)
    from torch._dynamo.utils import counters

    print("dynamo counters after it:", {k: dict(v) for k, v in counters.items() if v})
    _variant("torchmics P=1, no reshard after forward, eager", shape, sharded=True, compiled=False, reshard=False)
    _variant("torchmics P=1, no reshard after forward, compiled", shape, sharded=True, compiled=True, reshard=False)
    torch._dynamo.reset()
    model = _sharded(_model(*shape))
    x = torch.randn(4, SEQ, shape[1], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    explanation = torch._dynamo.explain(model.blocks[0])(x)
    print(f"explain(one sharded block): {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)")
    for reason in explanation.break_reasons:
        print("  break:", reason.reason, "at", reason.user_stack[-1] if reason.user_stack else "?")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
