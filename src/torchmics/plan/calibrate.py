"""Fit a cluster profile's link bandwidths and compute efficiency to our own benchmark results.

The shipped profiles quote vendor and third-party numbers; a prediction is only as good as those.
``torchmics bench`` writes JSONL with two kinds of lines, and each fits one part of the profile:

* collective lines (``"kind": "collective"``, ``op``, ``algo``, ``bytes``, ``busbw_gbps`` in GB/s as
  nccl-tests reports it, ``nodes``, ``gpus_per_node``). The largest message is the one closest to
  the bandwidth limit (latency amortised), so it sets ``beta``: single-node lines give NVLink's
  per-GPU bus bandwidth; multi-node *flat* lines give the network's per-node bandwidth, because in
  the cost model a flat ring's bus bandwidth across nodes is exactly the node's network bandwidth
  (lines with the profile's GPUs per node are preferred: how a node's NICs are shared depends on it).
  Hierarchical lines mix both links and are not used.
* training result lines (``tokens_per_s_per_gpu``, ``mfu`` as a fraction, ``emulated``, ``nodes``). The
  highest MFU among single-node, non-emulated runs (all collectives on NVLink, nearly all hidden)
  becomes ``compute_mfu``; it slightly underestimates pure compute, which errs on the safe side.

Latencies (``alpha``) are kept: large messages cannot measure them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torchmics.plan.cluster import ClusterProfile, LinkClass

GB = 1e9


def calibrate(profile: ClusterProfile, results_jsonl_path: str | Path) -> ClusterProfile:
    """``profile`` with the bandwidths and MFU that ``results_jsonl_path`` supports replaced."""
    lines = _read_jsonl(Path(results_jsonl_path))
    collectives = [r for r in lines if r.get("kind") == "collective"]
    intra = _largest_busbw([r for r in collectives if r["nodes"] == 1])
    flat = [r for r in collectives if r["nodes"] > 1 and r.get("algo", "flat") == "flat"]
    inter = _largest_busbw([r for r in flat if r["gpus_per_node"] == profile.gpus_per_node] or flat)
    nvlink_runs = [r for r in lines if r.get("mfu") is not None and not r.get("emulated") and r.get("nodes") == 1]
    mfu = max((r["mfu"] for r in nvlink_runs), default=None)

    fitted = []
    if intra is not None:
        fitted.append(f"NVLink busbw {intra / GB:.1f} GB/s")
    if inter is not None:
        fitted.append(f"network busbw {inter / GB:.2f} GB/s per node")
    if mfu is not None:
        fitted.append(f"MFU {mfu:.3f}")
    return dataclasses.replace(
        profile,
        name=f"{profile.name}-calibrated",
        intra=_with_beta(profile.intra, intra),
        inter=_with_beta(profile.inter, inter),
        compute_mfu=profile.compute_mfu if mfu is None else mfu,
        source=f"{profile.source} Calibrated from {results_jsonl_path}: {', '.join(fitted) or 'nothing usable'}.",
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _largest_busbw(rows: list[dict[str, Any]]) -> float | None:
    """Bytes/s of the largest message's bus bandwidth (the best of repeats of that size)."""
    if not rows:
        return None
    largest = max(r["bytes"] for r in rows)
    return max(r["busbw_gbps"] for r in rows if r["bytes"] == largest) * GB


def _with_beta(link: LinkClass, beta: float | None) -> LinkClass:
    return link if beta is None else dataclasses.replace(link, beta=beta)
