"""Choose the partition size: the fastest one whose memory fits, by the memory and cost models.

MiCS's one knob is the partition size P. Too small and the model states do not fit; too large and
every all-gather crosses more nodes than it must. :func:`plan` evaluates every node-aligned P (and,
for groups spanning nodes, both flat and hierarchical collectives); :func:`recommend` picks one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchmics.plan.cluster import ClusterProfile
from torchmics.plan.cost import StepCost, step_time
from torchmics.plan.memory import GIB, HostMemoryEstimate, MemoryEstimate, estimate_host_memory, estimate_memory
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.strategy import Strategy
from torchmics.tables import markdown_table
from torchmics.topology import valid_partition_sizes

DEFAULT_MEMORY_FRACTION = 0.9  # headroom for allocator fragmentation and peaks the model misses
DEFAULT_OPTIONS = Strategy("mics")  # bf16 gathered units, fp32 gradient reduction, two-hop
TIE = 0.01  # candidates within 1% of the fastest are ties: the model is not more accurate than that


@dataclass(frozen=True)
class Candidate:
    """One strategy on one cluster: its memory, whether that fits, and its predicted speed."""

    strategy: Strategy
    label: str
    partition_size: int
    memory: MemoryEstimate
    budget: float  # usable bytes per GPU
    cost: StepCost
    host: HostMemoryEstimate
    host_budget: float  # usable host bytes per rank

    @property
    def limit(self) -> str | None:
        """The memory this candidate does not fit in (``"GPU"`` or ``"host"``), or ``None``."""
        if self.memory.total > self.budget:
            return "GPU"
        return "host" if self.host.peak > self.host_budget else None

    @property
    def fits(self) -> bool:
        return self.limit is None


def evaluate(
    model: ModelSpec,
    cluster: ClusterProfile,
    nodes: int,
    strategy: Strategy,
    micro_batch: int,
    accum: int = 1,
    activation_checkpointing: bool = False,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> Candidate:
    """Memory and step time of ``strategy`` on ``nodes`` nodes of ``cluster``."""
    world, k = nodes * cluster.gpus_per_node, cluster.gpus_per_node
    return Candidate(
        strategy=strategy,
        label=strategy.label(world, k),
        partition_size=strategy.partition(world, k),
        memory=estimate_memory(model, strategy, world, k, micro_batch, activation_checkpointing, accum=accum),
        budget=cluster.hbm_gib * GIB * memory_fraction,
        cost=step_time(model, cluster, nodes, strategy, micro_batch, accum, activation_checkpointing),
        host=estimate_host_memory(model, strategy, world, k),
        host_budget=cluster.host_gib * GIB * memory_fraction / (world if cluster.emulated else k),
    )


def plan(
    model: ModelSpec,
    cluster: ClusterProfile,
    nodes: int,
    micro_batch: int,
    accum: int = 1,
    activation_checkpointing: bool = False,
    options: Strategy = DEFAULT_OPTIONS,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> list[Candidate]:
    """Every valid MiCS partition size on ``nodes`` nodes, smallest first.

    ``options`` carries the precision and synchronisation settings all candidates share (its
    partition size is not used). P = world with flat collectives is ZeRO-3. A P = 1 candidate whose
    units, kept gathered from forward to backward, do not fit is evaluated resharding after forward.
    """
    world, k = nodes * cluster.gpus_per_node, cluster.gpus_per_node
    candidates = []
    for p in valid_partition_sizes(world, k):
        for hierarchical in (True, False) if p > k > 1 else (False,):
            strategy = options.with_sharding("mics", p, hierarchical)
            candidate = evaluate(model, cluster, nodes, strategy, micro_batch, accum, activation_checkpointing,
                                 memory_fraction)
            if not candidate.fits and strategy.keeps_gathered(p) and strategy.reshard_after_forward is None:
                resharded = dataclasses.replace(strategy, reshard_after_forward=True)  # what fits, at some speed
                candidate = evaluate(model, cluster, nodes, resharded, micro_batch, accum, activation_checkpointing,
                                     memory_fraction)
            candidates.append(candidate)
    return candidates


def recommend(candidates: list[Candidate]) -> Candidate:
    """The fastest candidate that fits; among near-ties (within 1%), the smallest partition.

    A smaller partition keeps collectives on fewer nodes, which is what MiCS argues for when the
    model cannot tell the difference. Raises ``ValueError`` when nothing fits.
    """
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise nothing_fits(candidates)
    best = max(c.cost.tokens_per_s_per_gpu for c in fitting)
    near = [c for c in fitting if c.cost.tokens_per_s_per_gpu >= (1 - TIE) * best]
    return min(near, key=lambda c: (c.partition_size, -c.cost.tokens_per_s_per_gpu))


def nothing_fits(candidates: list[Candidate]) -> ValueError:
    """The error for a model no candidate fits: which memory runs out at the widest partition, and what helps."""
    widest = max(candidates, key=lambda c: c.partition_size)
    if widest.limit == "host":
        return ValueError(
            f"the run needs {widest.host.peak / GIB:.1f} GiB of host memory per rank even at partition = world "
            f"({widest.partition_size} GPUs; {widest.host_budget / GIB:.1f} GiB usable per rank); use more "
            "nodes, or train without CPU offload"
        )
    return ValueError(
        f"the model needs {widest.memory.total_gib:.1f} GiB per GPU even at partition = world "
        f"({widest.partition_size} GPUs; {widest.budget / GIB:.1f} GiB usable per GPU); use more "
        f"GPUs, activation checkpointing, {'' if widest.strategy.cpu_offload else 'CPU offload, '}or a smaller micro-batch"
    )


def explain(candidates: list[Candidate], chosen: Candidate) -> str:
    """Why :func:`recommend` chose ``chosen``, in a sentence: what does not fit where, and how fast it is."""
    reasons = []
    for limit, usable in (("GPU", chosen.budget), ("host", chosen.host_budget)):
        unfit = [c for c in candidates if c.limit == limit]
        if unfit:
            widest = max(unfit, key=lambda c: c.partition_size)
            needs = widest.memory.total if limit == "GPU" else widest.host.peak
            sizes = ", ".join(dict.fromkeys(_size_name(c, candidates) for c in sorted(unfit, key=lambda c: c.partition_size)))
            reasons.append(f"P = {sizes} do not fit in {usable / GIB:.1f} GiB of {limit} memory usable per "
                           f"{'GPU' if limit == 'GPU' else 'rank'} (P = {_size_name(widest, candidates)} needs "
                           f"{needs / GIB:.1f} GiB)")
    fastest = max((c for c in candidates if c.fits), key=lambda c: c.cost.tokens_per_s_per_gpu)
    speed = f"{chosen.cost.tokens_per_s_per_gpu:,.0f} tokens/s per GPU"
    if fastest is chosen:
        reasons.append(f"it is the fastest that fits ({speed})")
    else:
        reasons.append(
            f"it predicts {speed}, within {TIE:.0%} of the fastest ({fastest.label}: "
            f"{fastest.cost.tokens_per_s_per_gpu:,.0f}), and among near-ties the smallest partition keeps "
            f"collectives on the fewest GPUs"
        )
    return "; ".join(reasons) + "."


def _size_name(candidate: Candidate, candidates: list[Candidate]) -> str:
    """``16``; or ``16 hier`` when the other collectives of P = 16 fit (the sentence must not call the chosen P unfit)."""
    siblings = [c for c in candidates if c.partition_size == candidate.partition_size]
    if all(c.limit == candidate.limit for c in siblings):
        return str(candidate.partition_size)
    return candidate.label.split("P=", 1)[1]


def render_table(candidates: list[Candidate], highlight: Candidate | None = None) -> str:
    """A markdown table of candidates; ``highlight`` (e.g. the recommendation) is marked with ``*``."""
    headers = ["", "strategy", "P", "memory GiB", "host GiB/rank", "fits", "step s", "tok/s/GPU", "MFU"]
    rows = [
        [
            "*" if c is highlight else "",
            c.label,
            c.partition_size,
            f"{c.memory.total_gib:.1f}",
            f"{c.host.peak / GIB:.1f}",
            "yes" if c.fits else f"no ({c.limit})",
            f"{c.cost.total:.2f}",
            f"{c.cost.tokens_per_s_per_gpu:,.0f}",
            f"{c.cost.mfu:.1%}",
        ]
        for c in candidates
    ]
    return markdown_table(headers, rows)
