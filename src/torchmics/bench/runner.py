"""One benchmark run per system: fresh processes, warm-up, then the median of timed steps.

Each system runs in its own set of spawned processes so that no memory, NCCL communicator or
allocator state carries over from the previous one; a system that fails is recorded with its
error instead of being dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import torchmics
from torchmics import hardware
from torchmics.bench.profile import profile_step
from torchmics.bench.spec import LEARNING_RATE, BenchSpec
from torchmics.bench.systems import SYSTEMS, reshards_after_forward
from torchmics.models import build_model, causal_lm_loss, logits_of
from torchmics.dtypes import DTYPES, replica_hop_format
from torchmics.topology import current_device, ensure_process_group
from torchmics.wrapping import compile_units
from torchmics.launch import LocalLaunch, spawn


@dataclass(frozen=True)
class BenchConfig:
    model: str
    micro_batch: int
    seq_len: int | None
    accum: int
    steps: int
    warmup: int
    nodes: int
    nproc: int
    reduce_dtype: str  # "bf16" | "fp32"
    param_dtype: str
    replica_reduce_dtype: str | None = None  # torchmics only: the replica hop's own dtype
    compile: bool = False  # torch.compile every unit and the loss (all systems alike)
    grad_clip: float | None = None  # clip the gradient norm every step, as train does (None: no clipping)
    profile_dir: str | None = None  # profile one extra step on rank 0 into this folder


def _partition_for(system: str, partition_size: int, world: int) -> int:
    return {"fsdp2-full": world, "deepspeed-zero3": world, "ddp": 1, "single": 1}.get(system, partition_size)


def _measure(cfg: BenchConfig, system: str, partition_size: int, out_file: str) -> None:
    """Runs on every rank; rank 0 writes the measured record to ``out_file``."""
    world = int(os.environ["WORLD_SIZE"])
    replica_dtype = replica_hop_format(cfg.replica_reduce_dtype)
    spec = BenchSpec(system, partition_size, world // cfg.nodes, DTYPES[cfg.reduce_dtype], DTYPES[cfg.param_dtype], replica_dtype)
    ensure_process_group()
    cuda = torch.cuda.is_available()
    device = current_device()
    torch.manual_seed(0)
    with torchmics.meta_init():  # every system materializes it: shards where it shards, whole where it does not
        model, info = build_model(cfg.model, cfg.seq_len)
    if cfg.compile:
        compile_units(model)
    prepared = SYSTEMS[system](spec, model)
    optimizer = prepared.optimizer or torch.optim.AdamW(prepared.model.parameters(), lr=LEARNING_RATE, fused=cuda)
    generator = torch.Generator(device=device).manual_seed(dist.get_rank())
    clip = prepared.clip_grad_norm or (lambda max_norm: torch.nn.utils.clip_grad_norm_(prepared.model.parameters(), max_norm))

    def run_step() -> None:
        for micro in range(cfg.accum):
            tokens = torch.randint(0, info.vocab_size, (cfg.micro_batch, info.seq_len + 1), device=device, generator=generator)
            autocast = torch.autocast(device.type, torch.bfloat16) if prepared.autocast else contextlib.nullcontext()
            with prepared.sync(micro == cfg.accum - 1), autocast:
                loss = causal_lm_loss(logits_of(prepared.model, tokens[:, :-1]), tokens[:, 1:], fused=cfg.compile) / cfg.accum
                (prepared.backward or torch.Tensor.backward)(loss)
        if cfg.grad_clip is not None:
            clip(cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for step in range(cfg.warmup + cfg.steps):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        run_step()
        if cuda:
            torch.cuda.synchronize()
        if step >= cfg.warmup:
            times.append(time.perf_counter() - began)
    step_time = torch.tensor(statistics.median(times), device=device)
    dist.all_reduce(step_time, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    profiled = {}
    if cfg.profile_dir and dist.get_rank() == 0:
        name = f"{system}-p{partition_size}-accum{cfg.accum}-{cfg.reduce_dtype}{'-compiled' if cfg.compile else ''}"
        profiled = {"profile": profile_step(run_step, Path(cfg.profile_dir) / name)}
    elif cfg.profile_dir:
        run_step()  # every rank takes part in the profiled step's collectives
    if dist.get_rank() == 0:
        record = _record(cfg, spec, info, step_time.item(), device) | profiled
        Path(out_file).write_text(json.dumps(record))


def _record(cfg: BenchConfig, spec: BenchSpec, info, step_time: float, device: torch.device) -> dict:
    tokens_per_gpu = cfg.micro_batch * info.seq_len * cfg.accum / step_time
    name = hardware.device_name(device)
    return {
        "system": spec.system,
        "partition_size": _partition_for(spec.system, spec.partition_size, cfg.nproc),
        "nodes": cfg.nodes,
        "gpus_per_node": spec.gpus_per_node,
        "emulated": cfg.nodes > 1,
        "accum": cfg.accum,
        "micro_batch": cfg.micro_batch,
        "seq_len": info.seq_len,
        "model": info.name,
        "num_params": info.num_params,
        "flops_per_token": info.flops_per_token,
        "reduce_dtype": cfg.reduce_dtype,
        "replica_reduce_dtype": cfg.replica_reduce_dtype if spec.system.startswith("torchmics") else None,
        "param_dtype": cfg.param_dtype,
        "step_time_s": step_time,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": hardware.mfu(tokens_per_gpu, info.flops_per_token, hardware.peak_flops(name)),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": name,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "compiled": cfg.compile,
        "reshard_after_forward": reshards_after_forward(spec),
        "grad_clip": cfg.grad_clip,
        "status": "ok",
    }


def run_system(cfg: BenchConfig, system: str, partition_size: int, timeout_s: float = 900) -> dict:
    """Measure one system in fresh processes; a failure becomes a record with its error."""
    out_file = f"/tmp/torchmics-bench-{os.getpid()}-{time.time_ns()}.json"
    launch = LocalLaunch(cfg.nproc, cfg.nodes, use_gpus=torch.cuda.is_available())
    try:
        spawn(_measure, launch, cfg, system, partition_size, out_file, timeout_s=timeout_s)
        record = json.loads(Path(out_file).read_text())
    except Exception as err:  # recorded, not raised: one failing peer must not hide the others
        record = {
            "system": system,
            "partition_size": _partition_for(system, partition_size, cfg.nproc),
            "nodes": cfg.nodes,
            "gpus_per_node": cfg.nproc // cfg.nodes,
            "emulated": cfg.nodes > 1,
            "accum": cfg.accum,
            "reduce_dtype": cfg.reduce_dtype,
            "status": "failed",
            "error": "".join(traceback.format_exception_only(err)).strip()[-2000:],
        }
    finally:
        Path(out_file).unlink(missing_ok=True)
    return record | {"config": asdict(cfg)}
