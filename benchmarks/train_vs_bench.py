"""Issue 14's checks from one gpu_1x_train.sh call: train against bench, torchmics against the plain loop.

Reads ``<dir>/results.jsonl`` (bench) and ``<dir>/train-{eager,compiled}/metrics.jsonl`` (train) and
prints a markdown table. Train's figure is recomputed here from metrics.jsonl as its summary defines
it (the median over the steps after the first log interval, whose time includes compilation).
Usage: python benchmarks/train_vs_bench.py benchmarks/results/h200-train-1x1
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _bench(records: list[dict], system: str, compiled: bool) -> dict | None:
    """The newest ok record of ``system`` in this mode."""
    found = [r for r in records if r["system"] == system and r.get("compiled", False) == compiled and r["status"] == "ok"]
    return found[-1] if found else None


def _median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def _train(run: Path) -> dict | None:
    records = _lines(run / "metrics.jsonl")
    if not records:
        return None
    log_every = json.loads((run / "config.json").read_text())["log_every"]
    timed = [r for r in records if r["step"] > log_every] or records
    return {key: _median(timed, key) for key in ("tokens_per_s_per_gpu", "mfu")} | {
        "peak_mem_gib": max(r["peak_mem_bytes"] for r in records) / 2**30}


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    mfu = f" ({100 * r['mfu']:.1f}%)" if r.get("mfu") is not None else ""
    memory = f", {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""
    return f"{r['tokens_per_s_per_gpu']:,.0f}{mfu}{memory}"


def _ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['tokens_per_s_per_gpu'] / b['tokens_per_s_per_gpu']:.3f}" if a and b else "-"


def main(folder: Path) -> None:
    bench = _lines(folder / "results.jsonl")
    print("| mode | bench single | bench torchmics | torchmics / single | train | train / bench torchmics |")
    print("|---|---|---|---|---|---|")
    for mode, compiled in (("eager", False), ("compiled", True)):
        single, ours, train = _bench(bench, "single", compiled), _bench(bench, "torchmics", compiled), _train(folder / f"train-{mode}")
        print(f"| {mode} | {_cell(single)} | {_cell(ours)} | {_ratio(ours, single)} | {_cell(train)} | {_ratio(train, ours)} |")
    print("\ntokens/s per GPU (MFU), peak memory; targets: train / bench within 0.97-1.03, compiled torchmics / single >= 0.98,"
          " MFU >= 55%")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
