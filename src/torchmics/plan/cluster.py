"""Hardware descriptions for the cost model: GPUs, links, and where each number comes from.

Every profile carries a ``source`` string: a number is either measured (and says where) or an
assumption (and says so). :func:`torchmics.plan.calibrate` replaces the link and compute numbers of
a profile with ones fitted to our own benchmark results.
"""

from __future__ import annotations

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

    ``compute_mfu`` is the fraction of ``peak_tflops`` a compute-bound step reaches without activation
    checkpointing (model FLOPs, the usual MFU); communication the model cannot hide comes on top.
    """

    name: str
    gpu: str
    gpus_per_node: int
    peak_tflops: float  # dense bf16
    hbm_gib: float
    intra: LinkClass  # NVLink / NVSwitch, per GPU
    inter: LinkClass  # network, per node
    compute_mfu: float
    source: str

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


GB = 1e9
_NVLINK_A100 = LinkClass(alpha=3e-6, beta=230 * GB)  # nccl-tests busbw, 8x A100 NVSwitch (NVIDIA/nccl#527)
_NVLINK_MEASURED = LinkClass(alpha=3e-6, beta=237 * GB)  # DESIGN.md s7: NCCL intra-node pair, H200 host

PROFILES: dict[str, ClusterProfile] = {
    p.name: p
    for p in (
        ClusterProfile(
            name="p4d",
            gpu="A100-SXM4-40GB",
            gpus_per_node=8,
            peak_tflops=312,
            hbm_gib=40,
            intra=_NVLINK_A100,
            inter=LinkClass(alpha=20e-6, beta=30 * GB),
            compute_mfu=0.55,
            source="AWS p4d.24xlarge, the MiCS paper's cluster. Network: 400 Gbps EFA (50 GB/s line rate); "
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
            intra=_NVLINK_A100,
            inter=LinkClass(alpha=10e-6, beta=320 * GB),
            compute_mfu=0.55,
            source="8x A100-80GB nodes with 3200 Gbps (400 GB/s line rate). Assumptions: 80% of line rate "
            "achievable (InfiniBand-class), 10 us per inter-node ring step, MFU 0.55.",
        ),
        ClusterProfile(
            name="h100-3200",
            gpu="H100-SXM5-80GB",
            gpus_per_node=8,
            peak_tflops=989,
            hbm_gib=80,
            intra=LinkClass(alpha=3e-6, beta=360 * GB),
            inter=LinkClass(alpha=10e-6, beta=320 * GB),
            compute_mfu=0.50,
            source="8x H100 nodes with 3200 Gbps (p5 / DGX H100). Assumptions: NVLink4 busbw 360 GB/s, 80% "
            "of the 400 GB/s line rate, 10 us per inter-node ring step; MFU 0.50 as we measured on H100 "
            "(DESIGN.md s7).",
        ),
        ClusterProfile(
            name="emulated-h200",
            gpu="H200",
            gpus_per_node=2,
            peak_tflops=989,
            hbm_gib=140,
            intra=_NVLINK_MEASURED,
            inter=LinkClass(alpha=50e-6, beta=5.4 * GB),
            compute_mfu=0.51,
            source="Our 4x H200 host as 2 emulated nodes x 2 GPUs (NCCL Socket over loopback between nodes). "
            "Measured (DESIGN.md s7): intra-node busbw 237 GB/s, cross-node pair 2.7 GB/s, MFU 0.51 on "
            "NVLink. Loopback sockets share no NIC (each GPU's connections are CPU-bound), so a node "
            "moves 2 x 2.7 GB/s. Assumption: 50 us per socket ring step. With these numbers the model "
            "predicts HSDP 2x2 two-hop at 20.0k tok/s/GPU (measured 21.5k) and ZeRO-3 at 5.4k "
            "(measured 7.8k).",
        ),
        ClusterProfile(
            name="emulated-h100",
            gpu="H100-SXM5-80GB",
            gpus_per_node=1,
            peak_tflops=989,
            hbm_gib=80,
            intra=_NVLINK_MEASURED,
            inter=LinkClass(alpha=50e-6, beta=2.2 * GB),
            compute_mfu=0.50,
            source="Our 2x H100 machine as 2 emulated nodes x 1 GPU. Measured (DESIGN.md s7): cross-node "
            "busbw 2.2 GB/s, MFU 0.50 on NVLink. Assumptions: 50 us per socket ring step; NVLink taken "
            "from the H200 host (unused with one GPU per node). Predicted vs measured tok/s/GPU: HSDP "
            "shard 1 two-hop 10.2k / 11.9k (fp32 reduce), 17.5k / 20.1k (bf16); ZeRO-3 3.3k / 6.1k; "
            "DDP 3.0k / 3.6k.",
        ),
    )
}


def get_profile(name: str) -> ClusterProfile:
    """The shipped profile called ``name``, or a ``ValueError`` listing them."""
    if name not in PROFILES:
        raise ValueError(f"unknown cluster profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name]
