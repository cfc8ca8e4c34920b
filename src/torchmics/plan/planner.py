"""Choose the partition size: the fastest one whose memory fits, by the memory and cost models.

MiCS's one knob is the partition size P. Too small and the model states do not fit; too large and
every all-gather crosses more nodes than it must. :func:`plan` evaluates every node-aligned P (and,
for groups spanning nodes, both flat and hierarchical collectives); :func:`recommend` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchmics.plan._table import markdown_table
from torchmics.plan.cluster import ClusterProfile
from torchmics.plan.cost import StepCost, step_time
from torchmics.plan.memory import GIB, MemoryEstimate, estimate_memory
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.strategy import Strategy
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

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget


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
    partition size is not used). P = world with flat collectives is ZeRO-3.
    """
    world, k = nodes * cluster.gpus_per_node, cluster.gpus_per_node
    candidates = []
    for p in valid_partition_sizes(world, k):
        for hierarchical in (True, False) if p > k > 1 else (False,):
            strategy = options.with_sharding("mics", p, hierarchical)
            candidates.append(
                evaluate(model, cluster, nodes, strategy, micro_batch, accum, activation_checkpointing, memory_fraction)
            )
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
    """The error for a model no candidate fits: what the widest partition still needs, and what helps."""
    widest = max(candidates, key=lambda c: c.partition_size)
    return ValueError(
        f"the model needs {widest.memory.total_gib:.1f} GiB per GPU even at partition = world "
        f"({widest.partition_size} GPUs; {widest.budget / GIB:.1f} GiB usable per GPU); use more "
        f"GPUs, activation checkpointing, or a smaller micro-batch"
    )


def explain(candidates: list[Candidate], chosen: Candidate) -> str:
    """Why :func:`recommend` chose ``chosen``, in a sentence: what does not fit, and how fast it is."""
    reasons = []
    unfit = sorted({c.partition_size for c in candidates if not c.fits})
    if unfit:
        needs = max((c for c in candidates if not c.fits), key=lambda c: c.partition_size).memory.total_gib
        reasons.append(
            f"P = {', '.join(map(str, unfit))} do not fit in {chosen.budget / GIB:.1f} GiB usable per GPU "
            f"(P = {unfit[-1]} needs {needs:.1f} GiB)"
        )
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


def render_table(candidates: list[Candidate], highlight: Candidate | None = None) -> str:
    """A markdown table of candidates; ``highlight`` (e.g. the recommendation) is marked with ``*``."""
    headers = ["", "strategy", "P", "memory GiB", "fits", "step s", "tok/s/GPU", "MFU"]
    rows = [
        [
            "*" if c is highlight else "",
            c.label,
            c.partition_size,
            f"{c.memory.total_gib:.1f}",
            "yes" if c.fits else "no",
            f"{c.cost.total:.2f}",
            f"{c.cost.tokens_per_s_per_gpu:,.0f}",
            f"{c.cost.mfu:.1%}",
        ]
        for c in candidates
    ]
    return markdown_table(headers, rows)
