"""`torchmics bench`: every system on the same GPUs in one invocation, results committed as tables."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from rich.console import Console

from torchmics.arguments import non_negative_int, positive_int
from torchmics.bench.collectives import measure_collectives
from torchmics.bench.deepspeed_peer import DEEPSPEED_UNAVAILABLE
from torchmics.bench.report import results_table, write_outputs
from torchmics.bench.runner import BenchConfig, run_system
from torchmics.bench.systems import RENAMED_SYSTEMS, SINGLE_DEVICE_SYSTEMS, SYSTEMS
from torchmics.dtypes import REPLICA_HOP_FORMATS, TRAINING_DTYPES
from torchmics.models import build_model
from torchmics.tables import read_jsonl
from torchmics.topology import validate
from torchmics.launch import LocalLaunch, spawn

ON_GPU = torch.cuda.is_available()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark torchmics against FSDP2, HSDP and DDP on the same GPUs",
                              description="Measures tokens/s per GPU, MFU and peak memory of each system. "
                              "On CPU it runs a tiny model on gloo (a functional check, not a figure).")
    p.add_argument("--model", default="1.4b" if ON_GPU else "tiny", help="a GPT preset or hf:<config.json> (default: %(default)s)")
    p.add_argument("--systems", default=None, help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: all; "
                   f"{', '.join(SINGLE_DEVICE_SYSTEMS)} only with --nproc 1)")
    p.add_argument("--partition-size", type=positive_int, default=None, help="torchmics/HSDP partition size (default: GPUs per node)")
    p.add_argument("--nproc", type=positive_int, default=torch.cuda.device_count() or 4,
                   help="processes on this machine (default: %(default)s)")
    p.add_argument("--emulate-nodes", type=positive_int, default=1,
                   help="split the processes into this many emulated nodes, dividing --nproc (default: %(default)s)")
    p.add_argument("--accum", type=positive_int, default=4 if ON_GPU else 2,
                   help="micro-steps per optimizer step (default: %(default)s)")
    p.add_argument("--micro-batch", type=positive_int, default=4 if ON_GPU else 2,
                   help="sequences per GPU per micro-step (default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--steps", type=positive_int, default=6 if ON_GPU else 2,
                   help="timed steps, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=non_negative_int, default=3 if ON_GPU else 1,
                   help="untimed steps first (default: %(default)s)")
    p.add_argument("--reduce-dtype", choices=TRAINING_DTYPES, default="bf16",
                   help="gradient reduction dtype (default: %(default)s)")
    p.add_argument("--param-dtype", choices=TRAINING_DTYPES, default="bf16" if ON_GPU else "fp32",
                   help="compute dtype of the gathered parameters (default: %(default)s)")
    p.add_argument("--replica-reduce-dtype", choices=REPLICA_HOP_FORMATS, default=None,
                   help="torchmics systems: format of the replica hop (precision per hop; int8 / fp8: quantized "
                   "blocks with error feedback); default: --reduce-dtype")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every unit (blocks) of every system, and the loss (fused cross-entropy)")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="clip the gradient norm every step, as `torchmics train` does (default: no clipping; "
                   "not for DeepSpeed systems)")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra step per system (rank 0): kernel table and Chrome trace in <out>/profiles, "
                   "compute / communication / exposed seconds in results.jsonl")
    p.add_argument("--collectives", action="store_true", help="measure flat vs hierarchical collectives instead")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>-<nodes>x<gpus>)")
    p.set_defaults(run=run)


def _systems(args: argparse.Namespace) -> list[str]:
    """The systems asked for (default: every one that fits ``--nproc``), checked before anything runs."""
    if args.systems is None:
        return [s for s in SYSTEMS if args.nproc == 1 or s not in SINGLE_DEVICE_SYSTEMS]
    systems = [RENAMED_SYSTEMS.get(s, s) for s in args.systems.split(",")]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        why = f" ({DEEPSPEED_UNAVAILABLE})" if DEEPSPEED_UNAVAILABLE and any(s.startswith("deepspeed") for s in unknown) else ""
        raise ValueError(f"unknown systems {unknown}{why}; valid: {', '.join(SYSTEMS)}")
    single = [s for s in systems if s in SINGLE_DEVICE_SYSTEMS]
    if single and args.nproc != 1:
        raise ValueError(f"{', '.join(single)} runs on one GPU: bench it with --nproc 1 (got --nproc {args.nproc})")
    if args.grad_clip is not None and any(s.startswith("deepspeed") for s in systems):
        raise ValueError("--grad-clip is not supported for DeepSpeed systems (DeepSpeed clips inside its engine)")
    return systems


def _config(args: argparse.Namespace) -> BenchConfig:
    args.systems = ",".join(_systems(args))
    LocalLaunch(args.nproc, args.emulate_nodes)  # validates the split into nodes
    with torch.device("meta"):  # an unknown preset or too long a sequence, refused here and not per system
        build_model(args.model, args.seq_len)
    profile_dir = str(_out_dir(args) / "profiles") if args.profile else None
    return BenchConfig(args.model, args.micro_batch, args.seq_len, args.accum, args.steps, args.warmup,
                       args.emulate_nodes, args.nproc, args.reduce_dtype, args.param_dtype, args.replica_reduce_dtype,
                       compile=args.compile, grad_clip=args.grad_clip, profile_dir=profile_dir)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    device = torch.cuda.get_device_name(0).split()[-1].lower() if ON_GPU else "cpu"
    return Path("benchmarks/results") / f"{device}-{args.emulate_nodes}x{args.nproc // args.emulate_nodes}"


def run(args: argparse.Namespace) -> None:
    cfg, console, out_dir = _config(args), Console(soft_wrap=True), _out_dir(args)
    gpus_per_node = cfg.nproc // cfg.nodes
    if args.collectives:
        out_file = f"/tmp/torchmics-collectives-{os.getpid()}.jsonl"
        spawn(measure_collectives, LocalLaunch(cfg.nproc, cfg.nodes, use_gpus=ON_GPU), gpus_per_node, out_file)
        records = read_jsonl(out_file)
        Path(out_file).unlink()
    else:
        partition = args.partition_size or gpus_per_node
        validate(cfg.nproc, gpus_per_node, partition)
        records = []
        for system in args.systems.split(","):
            began = time.perf_counter()
            records.append(run_system(cfg, system, partition))
            console.print(f"{system}: {records[-1]['status']} ({time.perf_counter() - began:.0f} s)")
    write_outputs(out_dir, records)
    console.print(results_table(records))
    console.print(f"appended to {out_dir}/results.jsonl; table {out_dir}/results.md, chart {out_dir}/results.png")
