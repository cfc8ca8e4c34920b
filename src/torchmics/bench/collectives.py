"""`torchmics bench --collectives`: bus bandwidth of flat vs hierarchical collectives per message size.

Bus bandwidth (NCCL-tests' definition) normalizes by the ``(p - 1) / p`` share of the message every
rank must move, so numbers are comparable across group sizes and with the link's raw speed; they
also calibrate the planner's cost model.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import torchmics
from torchmics.collectives import HierarchicalAllGather, HierarchicalReduceScatter
from torchmics._fsdp import all_gather_single, reduce_scatter_single
from torchmics.topology import current_device

MESSAGE_BYTES = [2**20, 2**22, 2**24, 2**26, 2**28]
CPU_MESSAGE_BYTES = [2**16, 2**18, 2**20]  # gloo on loopback: a functional check, not a figure


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: communicator set-up and buffer allocation stay out of the numbers
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _candidates(topo: torchmics.Topology, group: dist.ProcessGroup) -> dict[str, tuple]:
    flat = (lambda out, inp: all_gather_single(out, inp, group=group),
            lambda out, inp: reduce_scatter_single(out, inp, group=group))
    algos = {"flat": flat}
    if topo.hierarchical:
        gather, scatter = HierarchicalAllGather(topo), HierarchicalReduceScatter(topo)
        algos["hierarchical"] = (lambda out, inp: gather(out, inp, group),
                                 lambda out, inp: scatter(out, inp, group, dist.ReduceOp.SUM))
    return algos


def measure_collectives(gpus_per_node: int, out_file: str, repeats: int = 5) -> None:
    """Runs on every rank of a partition group spanning the whole world; rank 0 writes JSON lines."""
    sizes = MESSAGE_BYTES if torch.cuda.is_available() else CPU_MESSAGE_BYTES
    topo = torchmics.init_mesh(partition_size=None, gpus_per_node=gpus_per_node)
    p, group = topo.partition_size, topo.mesh.get_group("shard")
    device = current_device()
    records = []
    for size in sizes:
        numel = size // 2 // p * p  # bf16 elements, divisible by the group
        full = torch.randn(numel, device=device).to(torch.bfloat16)
        shard = full[: numel // p].clone()
        for algo, (all_gather, reduce_scatter) in _candidates(topo, group).items():
            for op, fn in (("all_gather", lambda: all_gather(full, shard)), ("reduce_scatter", lambda: reduce_scatter(shard, full))):
                seconds = _time(fn, repeats)
                records.append({
                    "kind": "collective", "op": op, "algo": algo, "bytes": numel * 2, "time_s": seconds,
                    "busbw_gbps": numel * 2 * (p - 1) / p / seconds / 1e9,
                    "nodes": topo.num_nodes, "gpus_per_node": topo.gpus_per_node, "ranks": p,
                })
    if dist.get_rank() == 0:
        Path(out_file).write_text("".join(json.dumps(r) + "\n" for r in records))
