"""Weak scaling past the cluster we have: ZeRO-3, MiCS and DDP from 8 to 1024 GPUs, by the cost model.

Each GPU keeps the same micro-batch and accumulation at every size (weak scaling), so a perfectly
scaling system keeps its tokens/s per GPU; the efficiency of a size is its tokens/s per GPU over that
of the smallest size at which the same strategy fits. MiCS uses the partition size the planner
recommends at each size; a strategy that does not fit in memory at a size has no row there.

On the MiCS paper's setting (p4d, a 100B-class model) this model reproduces MiCS's near-linear
scaling but not the size of its lead over ZeRO-3, which physics the model has cannot make large:

* with 40 GB GPUs a 100B model needs P >= 64, so MiCS's partition groups span 8 nodes too. A ring
  moves ``(p-1)/p`` of every unit through each node's network whatever ``p`` is, so MiCS saves only
  ``(k-1)/p`` of the volume and the latency of ``p - m`` ring steps;
* FSDP2 gathers one transformer block (~0.8B parameters, 1.6 GB) per collective, so even at 512
  ranks each ring step moves ~3 MB, and 20 us of latency per step adds ~20% to a bf16 all-gather
  (5% at 128 ranks), not a factor of 2-3.
With micro-batch 4, accumulation 4, bf16 reduction and checkpointing, ZeRO-3 keeps 87% from 128 to
512 GPUs and MiCS (P=64) 99%, 1.18x ZeRO-3. The paper's gap needs ZeRO-3 to pay latency far more
often: with 50 us per step ZeRO-3 keeps 75% (MiCS 1.45x); with four collectives per block as well
(DeepSpeed's per-submodule gathers; the same latency as 200 us per step) 50% and MiCS 2.8x. The
paper's 2.89x headline also came from models whose partitions fit inside a node. The shipped p4d
profile keeps what can be sourced; ``benchmarks/simulate/README.md`` gives the commands.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchmics.plan.cluster import ClusterProfile
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.planner import (
    DEFAULT_MEMORY_FRACTION,
    DEFAULT_OPTIONS,
    Candidate,
    evaluate,
    nothing_fits,
    plan,
    recommend,
)
from torchmics.plan.strategy import Strategy
from torchmics.tables import markdown_table

STRATEGIES = ("zero3", "mics", "ddp")


@dataclass(frozen=True)
class SimRow:
    """One strategy at one cluster size."""

    gpus: int
    strategy: str  # "zero3" | "mics" | "ddp"
    label: str  # e.g. "mics P=64 hier"
    partition_size: int
    tokens_per_s_per_gpu: float
    mfu: float
    memory_gib: float
    efficiency: float  # tokens/s per GPU relative to this strategy's smallest fitting size


def smallest_default_size(gpus_per_node: int) -> int:
    """Where the default sweep starts: one node, or 8 GPUs if nodes are smaller."""
    return max(8, gpus_per_node)


def default_sizes(gpus_per_node: int, max_gpus: int = 1024) -> list[int]:
    """Powers of two from :func:`smallest_default_size` up to ``max_gpus``."""
    sizes, g = [], smallest_default_size(gpus_per_node)
    while g <= max_gpus:
        sizes.append(g)
        g *= 2
    return sizes


def simulate(
    model: ModelSpec,
    cluster: ClusterProfile,
    micro_batch: int,
    accum: int = 1,
    activation_checkpointing: bool = False,
    gpus: Sequence[int] | None = None,
    options: Strategy = DEFAULT_OPTIONS,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> list[SimRow]:
    """Rows for every (size, strategy) that fits, ordered by size then ``STRATEGIES``.

    Raises ``ValueError`` for sizes that are not whole nodes, and (with the planner's explanation)
    when nothing fits at any size.
    """
    sizes = list(gpus or default_sizes(cluster.gpus_per_node))
    if not sizes or any(g < 1 or g % cluster.gpus_per_node for g in sizes):
        raise ValueError(f"cluster sizes {sizes} must be whole nodes of {cluster.gpus_per_node} GPUs")
    args = (micro_batch, accum, activation_checkpointing)
    found: list[tuple[int, str, Candidate]] = []
    for g in sizes:
        nodes = g // cluster.gpus_per_node
        for kind in STRATEGIES:
            chosen = _simulated(kind, model, cluster, nodes, options, args, memory_fraction)
            if chosen is not None:
                found.append((g, kind, chosen))
    if not found:
        widest = plan(model, cluster, max(sizes) // cluster.gpus_per_node, *args, options, memory_fraction)
        raise ValueError(f"nothing fits at any size up to {max(sizes)} GPUs: {nothing_fits(widest)}")
    return _with_efficiency(found)


def _simulated(
    kind: str,
    model: ModelSpec,
    cluster: ClusterProfile,
    nodes: int,
    options: Strategy,
    args: tuple[int, int, bool],
    memory_fraction: float,
) -> Candidate | None:
    """What ``kind`` runs at this size (MiCS: the planner's choice), or None when it does not fit."""
    if kind == "mics":
        fitting = [c for c in plan(model, cluster, nodes, *args, options, memory_fraction) if c.fits]
        return recommend(fitting) if fitting else None
    strategy = options.with_sharding(kind, 1 if kind == "ddp" else None)
    candidate = evaluate(model, cluster, nodes, strategy, *args, memory_fraction)
    return candidate if candidate.fits else None


def _with_efficiency(found: list[tuple[int, str, Candidate]]) -> list[SimRow]:
    base: dict[str, float] = {}
    rows = []
    for g, strategy, c in found:
        tps = c.cost.tokens_per_s_per_gpu
        base.setdefault(strategy, tps)
        rows.append(
            SimRow(g, strategy, c.label, c.partition_size, tps, c.cost.mfu, c.memory.total_gib, tps / base[strategy])
        )
    return rows


def render_rows(rows: list[SimRow]) -> str:
    """The simulation as a markdown table, one row per (size, strategy)."""
    return markdown_table(
        ["GPUs", "strategy", "P", "tok/s/GPU", "MFU", "memory GiB", "efficiency"],
        [
            [
                r.gpus,
                r.label,
                r.partition_size,
                f"{r.tokens_per_s_per_gpu:,.0f}",
                f"{r.mfu:.1%}",
                f"{r.memory_gib:.1f}",
                f"{r.efficiency:.1%}",
            ]
            for r in rows
        ],
    )


def write_outputs(
    rows: list[SimRow], out_dir: str | Path, title: str = "Weak scaling (cost model)", notes: str = ""
) -> list[Path]:
    """Write ``simulate.md`` (title, ``notes``, table), ``simulate.jsonl`` (one row a line), ``simulate.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "simulate.md", out / "simulate.jsonl", out / "simulate.png"]
    paths[0].write_text(f"# {title}\n\n" + (f"{notes}\n\n" if notes else "") + f"{render_rows(rows)}\n")
    paths[1].write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows))
    _plot(rows, title, paths[2])
    return paths


def _plot(rows: list[SimRow], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (throughput, efficiency) = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in STRATEGIES:
        mine = [r for r in rows if r.strategy == strategy]
        if not mine:
            continue
        x = [r.gpus for r in mine]
        throughput.plot(x, [r.tokens_per_s_per_gpu for r in mine], marker="o", label=strategy)
        efficiency.plot(x, [r.efficiency for r in mine], marker="o", label=strategy)
    for ax, ylabel in ((throughput, "tokens/s per GPU"), (efficiency, "weak-scaling efficiency")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 512, not 2^9
        ax.set_ylim(bottom=0)  # differences drawn to scale
        ax.set_xlabel("GPUs")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    efficiency.set_ylim(top=1.05)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
