"""Hardware descriptions for the cost model: GPUs, links, and where each number comes from.

Every profile carries a ``source`` string: a number is either measured (and says where) or an
assumption (and says so). :func:`torchmics.plan.calibrate` replaces the link and compute numbers of
a profile with ones fitted to our own benchmark results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkClass:
    """One class of link in the alpha-beta model: a ring step moving ``n`` bytes costs ``alpha + n/beta``.

    ``beta`` is a *bus* bandwidth in bytes/s (nccl-tests' busbw), so a ring collective over ``p`` ranks
    moves ``(p-1)/p`` of the message through it. For NVLink it is per GPU; for the network it is per
    node (all NICs together), because a ring enters and leaves each node once per channel however many
    GPUs the node holds.
    """

    alpha: float  # seconds per ring step
    beta: float  # bytes per second


@dataclass(frozen=True)
class ClusterProfile:
    """A homogeneous cluster: ``gpus_per_node`` GPUs on NVLink per node, nodes joined by a network.

    ``compute_mfu`` is the fraction of ``peak_tflops`` that forward and backward reach when nothing
    waits for communication (model FLOPs, the usual MFU); the optimizer step and communication the
    model cannot hide come on top. ``emulated``: the "nodes" are groups of one host's GPUs talking
    through NCCL's socket transport (``torchmics train --emulate-nodes``).
    """

    name: str
    gpu: str
    gpus_per_node: int
    peak_tflops: float  # dense bf16
    hbm_gib: float
    hbm_tbps: float  # memory bandwidth (datasheet): the memory-bound optimizer step runs at it
    host_gib: float  # host memory per node (per host, for emulated nodes): where CPU offload puts the model states
    intra: LinkClass  # NVLink / NVSwitch, per GPU
    inter: LinkClass  # network, per node
    compute_mfu: float
    source: str
    emulated: bool = False

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


def with_gpus_per_node(profile: ClusterProfile, gpus_per_node: int) -> ClusterProfile:
    """``profile`` with nodes of ``gpus_per_node`` GPUs (a job may use fewer GPUs than a node has).

    A real node keeps its network bandwidth (its NICs, whichever GPUs use them). Between emulated
    nodes there is no NIC to share: every GPU's loopback socket connections are CPU-bound on their
    own, so an emulated node's bandwidth grows with its GPUs.
    """
    inter = profile.inter
    if profile.emulated:
        inter = dataclasses.replace(inter, beta=inter.beta * gpus_per_node / profile.gpus_per_node)
    return dataclasses.replace(profile, gpus_per_node=gpus_per_node, inter=inter)


GB = 1e9
_NVLINK_A100 = LinkClass(alpha=3e-6, beta=230 * GB)  # nccl-tests busbw, 8x A100 NVSwitch (NVIDIA/nccl#527)
_NVLINK_H100 = LinkClass(alpha=3e-6, beta=360 * GB)  # assumption: NVLink4 busbw, 8x H100/H200 NVSwitch
_NVLINK_MEASURED = LinkClass(alpha=3e-6, beta=237 * GB)  # docs/design.md §7: NCCL intra-node pair, H200 host
_NETWORK_3200 = LinkClass(alpha=10e-6, beta=320 * GB)  # assumption: 80% of 3200 Gbps, 10 us per ring step
# Fitted by `calibrate` to the collective lines of benchmarks/results/h100-emulated-2x1 (1 to 256 MiB).
_LOOPBACK_SOCKET = LinkClass(alpha=157e-6, beta=2.88 * GB)

PROFILES: dict[str, ClusterProfile] = {
    p.name: p
    for p in (
        ClusterProfile(
            name="p4d",
            gpu="A100-SXM4-40GB",
            gpus_per_node=8,
            peak_tflops=312,
            hbm_gib=40,
            hbm_tbps=1.555,
            host_gib=1152,
            intra=_NVLINK_A100,
            inter=LinkClass(alpha=20e-6, beta=30 * GB),
            compute_mfu=0.55,
            source="AWS p4d.24xlarge, the MiCS paper's cluster; 1152 GiB host memory. Network: 400 Gbps EFA (50 GB/s line rate); "
            "busbw 30 GB/s is measured (NVIDIA/nccl#527: 1 GiB all-reduce on 4 p4dn nodes, 29.6 GB/s). "
            "Assumptions: 20 us per inter-node ring step (EFA + NCCL proxy), MFU 0.55 (the paper's "
            "54.5% of peak).",
        ),
        ClusterProfile(
            name="a100-80gb-3200",
            gpu="A100-SXM4-80GB",
            gpus_per_node=8,
            peak_tflops=312,
            hbm_gib=80,
            hbm_tbps=2.039,
            host_gib=1152,
            intra=_NVLINK_A100,
            inter=_NETWORK_3200,
            compute_mfu=0.55,
            source="Host memory 1152 GiB as AWS p4de.24xlarge (assumption). 8x A100-80GB nodes with 3200 Gbps (400 GB/s line rate). Assumptions: 80% of line rate "
            "achievable (InfiniBand-class), 10 us per inter-node ring step, MFU 0.55.",
        ),
        ClusterProfile(
            name="h100-3200",
            gpu="H100-SXM5-80GB",
            gpus_per_node=8,
            peak_tflops=989,
            hbm_gib=80,
            hbm_tbps=3.35,
            host_gib=2048,
            intra=_NVLINK_H100,
            inter=_NETWORK_3200,
            compute_mfu=0.476,
            source="Host memory 2048 GiB as AWS p5.48xlarge (assumption). 8x H100 nodes with 3200 Gbps (p5 / DGX H100). Assumptions: NVLink4 busbw 360 GB/s, 80% "
            "of the 400 GB/s line rate, 10 us per inter-node ring step. MFU 0.476 is calibrated on our "
            "2x H100 NVLink runs (benchmarks/results/h100-nvlink-1x2).",
        ),
        ClusterProfile(
            name="h200-3200",
            gpu="H200",
            gpus_per_node=8,
            peak_tflops=989,
            hbm_gib=140,
            hbm_tbps=4.8,
            host_gib=2048,
            intra=_NVLINK_H100,
            inter=_NETWORK_3200,
            compute_mfu=0.51,
            source="Host memory 2048 GiB as AWS p5e.48xlarge (assumption). 8x H200 nodes with 3200 Gbps. Assumptions as h100-3200 (same NVLink4 and network); MFU "
            "0.51 as measured on NVLink on our H200 host (docs/design.md §7).",
        ),
        ClusterProfile(  # kept as measured: the H200 host's sockets were slower than the H100 host's
            name="emulated-h200",
            gpu="H200",
            gpus_per_node=2,
            peak_tflops=989,
            hbm_gib=140,
            hbm_tbps=4.8,
            host_gib=512,
            intra=_NVLINK_MEASURED,
            inter=LinkClass(alpha=_LOOPBACK_SOCKET.alpha, beta=2 * 2.7 * GB),
            compute_mfu=0.51,
            emulated=True,
            source="Host memory 512 GiB (the 4x H200 host). Our 4x H200 host as 2 emulated nodes x 2 GPUs (NCCL Socket over loopback between nodes). "
            "Measured (docs/design.md §7): intra-node busbw 237 GB/s, cross-node pair 2.7 GB/s, MFU 0.51 on "
            "NVLink. Loopback sockets share no NIC (each GPU's connections are CPU-bound), so a node "
            "moves 2 x 2.7 GB/s. Assumption: 157 us per socket ring step, as fitted on the H100 host.",
        ),
    )
}


def emulated_nodes(host: ClusterProfile, name: str | None = None) -> ClusterProfile:
    """``host``'s GPUs as emulated nodes of one GPU each (regroup with :func:`with_gpus_per_node`).

    Between emulated nodes NCCL uses its socket transport over loopback: the link fitted by
    ``calibrate`` to our H100 host's collective lines (CPU-bound; another host's CPUs may differ).
    """
    return dataclasses.replace(
        host,
        name=name or f"emulated-{host.name}",
        gpus_per_node=1,
        inter=_LOOPBACK_SOCKET,
        emulated=True,
        source=f"{host.gpu} GPUs of one host as emulated nodes: NCCL socket over loopback between them, "
        f"alpha {_LOOPBACK_SOCKET.alpha * 1e6:.0f} us and busbw {_LOOPBACK_SOCKET.beta / GB:.2f} GB/s per GPU, "
        f"fitted to the collective lines of benchmarks/results/h100-emulated-2x1. Compute and NVLink as "
        f"{host.name}: {host.source}",
    )


_emulated_h100 = emulated_nodes(PROFILES["h100-3200"], name="emulated-h100")
PROFILES[_emulated_h100.name] = _emulated_h100


def get_profile(name: str) -> ClusterProfile:
    """The shipped profile called ``name``, or a ``ValueError`` listing them."""
    if name not in PROFILES:
        raise ValueError(f"unknown cluster profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]
