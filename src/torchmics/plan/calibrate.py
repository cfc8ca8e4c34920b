"""Fit a cluster profile's links and compute efficiency to our own benchmark results.

The shipped profiles quote vendor and third-party numbers; a prediction is only as good as those.
``torchmics bench`` writes JSONL with two kinds of lines, and each fits one part of the profile:

* collective lines (``"kind": "collective"``, ``op``, ``algo``, ``bytes``, ``time_s``, ``ranks``,
  ``nodes``, ``gpus_per_node``). The alpha-beta model of one ring, ``t = (p-1)*alpha + (p-1)/p *
  bytes/beta``, is fitted to their times by least squares on the relative error, so every message
  size counts alike. Single-node lines fit NVLink; multi-node *flat* lines fit the network (per
  node: in the cost model a flat ring's bus bandwidth across nodes is the node's network bandwidth;
  lines with the profile's GPUs per node are preferred). Hierarchical lines mix both links: unused.
  The fitted ``alpha`` includes the launch and synchronisation a timed collective pays, so it is an
  upper bound for collectives queued back to back in training. With one message size only ``beta``
  is fitted.
* training result lines of single-node, non-emulated runs (all collectives on NVLink). For each, the
  ``compute_mfu`` at which the cost model reproduces its measured step time is found (so the optimizer
  step and the little communication NVLink leaves exposed are not counted as slow compute); the median
  over runs becomes the profile's. Runs across (emulated) nodes are never used: they are what a
  calibrated profile must predict, not what it is fitted to.

Several results files (say NVLink runs and emulated nodes of the same machine) calibrate one profile
by calling :func:`calibrate` once per file.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from torchmics.plan.cluster import ClusterProfile, LinkClass, with_gpus_per_node
from torchmics.plan.records import Record, predict_record, training_records
from torchmics.tables import read_jsonl

GB = 1e9
SUFFIX = "-calibrated"


def calibrate(profile: ClusterProfile, results_jsonl_path: str | Path) -> ClusterProfile:
    """``profile`` with the links and MFU that ``results_jsonl_path`` measures replaced."""
    return calibrate_lines(profile, read_jsonl(results_jsonl_path), str(results_jsonl_path))


def _fit_network(profile: ClusterProfile, flat: list[Record]) -> LinkClass:
    """The network fitted to flat multi-node lines, per node of the profile's size.

    Lines measured with another number of GPUs per node are fitted on the profile regrouped to
    their node size and converted back (:func:`with_gpus_per_node`: an emulated node's bandwidth
    grows with its GPUs, a real node's does not).
    """
    sizes = {r["gpus_per_node"] for r in flat}
    if profile.gpus_per_node in sizes or not sizes:
        k = profile.gpus_per_node
    elif len(sizes) == 1:
        (k,) = sizes
    else:
        raise ValueError(
            f"the collective lines come from nodes of {sorted(sizes)} GPUs, none of the profile's "
            f"{profile.gpus_per_node}: calibrate with one results file per node size"
        )
    regrouped = with_gpus_per_node(profile, k)
    fitted = fit_link(regrouped.inter, [r for r in flat if r["gpus_per_node"] == k])
    return dataclasses.replace(fitted, beta=fitted.beta * profile.inter.beta / regrouped.inter.beta)


def calibrate_lines(profile: ClusterProfile, lines: list[Record], origin: str) -> ClusterProfile:
    """:func:`calibrate` on lines already read (``origin`` names them in the profile's source)."""
    collectives = [r for r in lines if r.get("kind") == "collective"]
    flat = [r for r in collectives if r["nodes"] > 1 and r.get("algo", "flat") == "flat"]
    intra = fit_link(profile.intra, [r for r in collectives if r["nodes"] == 1])
    inter = _fit_network(profile, flat)
    linked = dataclasses.replace(profile, intra=intra, inter=inter)
    nvlink_runs = [r for r in training_records(lines) if r.get("nodes") == 1 and not r.get("emulated")]
    fits = [m for m in (_fit_compute_mfu(linked, r) for r in nvlink_runs) if m is not None]
    mfu = statistics.median(fits) if fits else profile.compute_mfu

    fitted = [
        f"{name} alpha {link.alpha * 1e6:.0f} us, busbw {link.beta / GB:.2f} GB/s"
        for name, link, old in (("NVLink", intra, profile.intra), ("network", inter, profile.inter))
        if link != old
    ] + ([f"MFU {mfu:.3f} (median of {len(fits)} NVLink runs)"] if fits else [])
    return dataclasses.replace(
        linked,
        name=profile.name if profile.name.endswith(SUFFIX) else profile.name + SUFFIX,
        compute_mfu=mfu,
        source=f"{profile.source} Calibrated from {origin}: {'; '.join(fitted) or 'nothing usable'}.",
    )


def fit_link(link: LinkClass, lines: list[Record]) -> LinkClass:
    """``link`` with alpha and beta fitted to collective ``lines`` (unchanged without lines).

    Weighted least squares for ``t = u*alpha + v/beta`` (``u = p-1``, ``v = (p-1)/p * bytes``),
    each line weighted by ``1/t`` so that small and large messages count alike.
    """
    rows = [(r["ranks"] - 1, (r["ranks"] - 1) / r["ranks"] * r["bytes"], r["time_s"]) for r in lines if r["ranks"] > 1]
    if not rows:
        return link
    if len({v for _, v, _ in rows}) == 1:  # one size cannot separate latency from bandwidth
        inverse_beta = statistics.fmean((t - u * link.alpha) / v for u, v, t in rows)
        return dataclasses.replace(link, beta=1 / inverse_beta)
    uu = sum((u / t) ** 2 for u, _, t in rows)
    uv = sum(u * v / t**2 for u, v, t in rows)
    vv = sum((v / t) ** 2 for _, v, t in rows)
    u1, v1 = sum(u / t for u, _, t in rows), sum(v / t for _, v, t in rows)
    det = uu * vv - uv**2
    alpha, inverse_beta = (u1 * vv - v1 * uv) / det, (uu * v1 - uv * u1) / det
    if alpha < 0:  # latency below what the sizes resolve: bandwidth alone, through the origin
        alpha, inverse_beta = 0.0, v1 / vv
    return LinkClass(alpha=alpha, beta=1 / inverse_beta)


def _fit_compute_mfu(profile: ClusterProfile, record: Record, steps: int = 40) -> float | None:
    """The ``compute_mfu`` at which the cost model predicts ``record``'s tokens/s (bisection).

    Predicted throughput only grows with ``compute_mfu``; a run the model cannot reach even at 100%
    (or one without a throughput, e.g. on CPU) fits nothing.
    """
    measured = record.get("tokens_per_s_per_gpu")
    if not measured or record.get("mfu") is None:
        return None

    def predicted(mfu: float) -> float:
        return predict_record(dataclasses.replace(profile, compute_mfu=mfu), record)[0].tokens_per_s_per_gpu

    low, high = 0.0, 1.0
    if predicted(high) < measured:
        return None
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if predicted(mid) < measured else (low, mid)
    return (low + high) / 2
