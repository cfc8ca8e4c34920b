"""Loss of one `torchmics train` job with each replica-hop format: fp32, bf16, int8 with and without error feedback.

Issue 19's check that a quantized replica hop trains like an exact one: the same job (tiny preset, 2 CPU
ranks as 2 emulated nodes, so the two replicas' hop crosses the emulated nodes; accumulation 2, two-hop)
for 1,500 steps per format, validation loss every 100 steps, one plot of all four.

    python benchmarks/replica_hop_loss.py --out benchmarks/results/cpu-replica-hop-loss
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HOPS = {"fp32": ["--replica-reduce-dtype", "fp32"], "bf16": ["--replica-reduce-dtype", "bf16"],
        "int8 + error feedback": ["--replica-reduce-dtype", "int8"],
        "int8, no error feedback": ["--replica-reduce-dtype", "int8", "--no-error-feedback"]}
JOB = ["--model", "tiny", "--nproc", "2", "--emulate-nodes", "2", "--partition-size", "1", "--accum", "2",
       "--eval-every", "100", "--log-every", "50", "--seed", "0"]


def run(out: Path, steps: int) -> dict[str, list[dict]]:
    records = {}
    for name, flags in HOPS.items():
        folder = out / name.replace(" ", "").replace(",", "-").replace("+", "-")
        if not (folder / "metrics.jsonl").exists():
            subprocess.run([sys.executable, "-m", "torchmics.cli", "train", *JOB, "--steps", str(steps), *flags,
                            "--out", str(folder)], check=True)
        records[name] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return records


def plot(records: dict[str, list[dict]], out: Path) -> None:
    figure, (train, val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in records.items():
        train.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=1)
        evals = [r for r in rows if r.get("val_loss") is not None]
        val.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], label=name, marker=".")
    for axes, title in ((train, "training loss"), (val, "validation loss")):
        axes.set(xlabel="step", title=f"{title}, replica hop by format", yscale="log")
        axes.legend()
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=120)


def summary(records: dict[str, list[dict]]) -> str:
    lines = ["| replica hop | final validation loss | final training loss |", "|---|---|---|"]
    for name, rows in records.items():
        last_val = [r for r in rows if r.get("val_loss") is not None][-1]
        lines.append(f"| {name} | {last_val['val_loss']:.4f} (step {last_val['step']}) | {rows[-1]['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = run(args.out, args.steps)
    plot(records, args.out)
    (args.out / "summary.md").write_text(summary(records))
    print(summary(records))


if __name__ == "__main__":
    main()
