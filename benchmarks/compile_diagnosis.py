"""Why compiled torchmics trailed the plain compiled loop at partition size 1 (issue 14), on one GPU.

The 1.4b preset, seq 2048, one process (world size 1), the whole training step as bench times it
(forward, backward, gradient clipping at 1.0, fused AdamW, zero_grad), compiled blocks and fused loss,
bf16 compute and fp32 gradient reduction. For each variant it prints the median step time (the device
finished before the clock stops), the host's time to queue a step (a step whose host time reaches its
device time is host-bound) and the peak memory:

- the plain loop (fp32 weights, bf16 autocast), bench's ``single``;
- FSDP2 alone on the one-rank mesh (``fully_shard`` per block and root): what torchmics ran before it
  skipped FSDP2's world-size-1 copies;
- torchmics with ``reshard_after_forward=True`` (``shard()``'s default): the copies skipped, but every
  unit gathered again (cast again) for backward;
- torchmics as ``train`` runs P = 1: the copies skipped and units kept gathered from forward to backward.

Then dynamo's counters and ``torch._dynamo.explain`` of one block (graphs, graph breaks and their
reasons), and with ``--profile DIR`` each variant's host-side table (self CPU time) for one step.
Usage: python benchmarks/compile_diagnosis.py [--model 1.4b] [--seq-len 2048] [--micro-batch 4 8] [--profile DIR]
(on a machine without a GPU it runs on the CPU: a check of the script, e.g. --model tiny --seq-len 64)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import torchmics
from torchmics import hardware
from torchmics.materialize import materialize
from torchmics.models import build_model, causal_lm_loss
from torchmics.sharding import shard_state
from torchmics.wrapping import compile_units, resolve_units

WARMUP, STEPS = 3, 10
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


VARIANTS = {
    "plain loop (fp32 weights, bf16 autocast)": "plain",
    "FSDP2 alone on the one-rank mesh": "fsdp2",
    "torchmics, reshard_after_forward=True": "reshard",
    "torchmics, kept gathered (as train runs P=1)": "torchmics",
}


def _build(variant: str, preset: str, seq: int, compiled: bool = True) -> tuple[torch.nn.Module, object]:
    torch._dynamo.reset()
    with torchmics.meta_init():
        model, info = build_model(preset, seq)
    if compiled:
        compile_units(model)
    if variant == "plain":
        materialize(model, DEVICE, 0)
        return model, info
    topo = torchmics.init_mesh(partition_size=1, gpus_per_node=1)
    if variant == "fsdp2":
        units = resolve_units(model, None)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unit in [*units, model]:
            fully_shard(unit, mesh=topo.mesh["shard"], mp_policy=policy)
        materialize(model, DEVICE, 0, [*units, model])
        return model, info
    mp = torchmics.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = variant == "reshard"
    return torchmics.shard(model, topo, mixed_precision=mp, reshard_after_forward=reshard, init_seed=0), info


def _measure(name: str, args: argparse.Namespace, micro_batch: int) -> None:
    variant = VARIANTS[name]
    model, info = _build(variant, args.model, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    ours = variant in ("reshard", "torchmics")
    clip = (lambda: torchmics.clip_grad_norm_(model, 1.0)) if ours else (
        lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    tokens = torch.randint(0, info.vocab_size, (micro_batch, args.seq_len + 1), device=DEVICE)
    autocast = (lambda: torch.autocast(DEVICE.type, torch.bfloat16)) if variant == "plain" else contextlib.nullcontext

    def step() -> None:
        with autocast():
            causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:], fused=True).backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for i in range(WARMUP + STEPS):
        _synchronize()
        began = time.perf_counter()
        step()
        queued = time.perf_counter()
        _synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - began)
            host.append(queued - began)
    step_s = statistics.median(times)
    tps = micro_batch * args.seq_len / step_s
    mfu = hardware.mfu(tps, info.flops_per_token, hardware.peak_flops(hardware.device_name(DEVICE))) or 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    print(f"{name:<48} mb {micro_batch}  step {1e3 * step_s:6.1f} ms  host {1e3 * statistics.median(host):6.1f} ms  "
          f"{tps:8,.0f} tok/s  MFU {100 * mfu:4.1f}%  peak {peak:5.1f} GiB", flush=True)
    if args.profile:
        _profile(step, args.profile / f"{variant}-mb{micro_batch}.txt")
    del model, optimizer
    if CUDA:
        torch.cuda.empty_cache()


def _profile(step, path: Path) -> None:
    """One step's host-side table: where the Python and dispatch time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as prof:
        step()
        _synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1.4b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29534"}.items():
        os.environ.setdefault(key, value)
    if CUDA:
        torch.cuda.set_device(0)
    print(f"{args.model}, seq {args.seq_len}, {hardware.device_name(DEVICE)}, torch {torch.__version__}, "
          "compiled blocks + fused loss")
    for mb in args.micro_batch:
        for name in VARIANTS:
            _measure(name, args, mb)
    from torch._dynamo.utils import counters

    print("dynamo counters after it:", {k: dict(v) for k, v in counters.items() if v})
    _explain_one_block(args)
    torch.distributed.destroy_process_group()


def _explain_one_block(args: argparse.Namespace) -> None:
    """Graph breaks inside a sharded block would split its compiled graph: there should be none."""
    torch._dynamo.reset()
    model, _ = _build("torchmics", args.model, args.seq_len, compiled=False)
    block = shard_state(model).units[0]
    x = torch.randn(1, args.seq_len, model.cfg.d_model, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    explanation = torch._dynamo.explain(block)(x)
    print(f"explain(one sharded block): {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)")
    for reason in explanation.break_reasons:
        print("  break:", reason.reason, "at", reason.user_stack[-1] if reason.user_stack else "?")


if __name__ == "__main__":
    main()
