"""Overlay the loss curves of several `torchmics train` runs and print their final losses."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(runs: list[Path]) -> None:
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    print("| run | final train loss (mean of last 100 steps) | final val loss |\n|---|---|---|")
    for run in runs:
        rows = records(run)
        val = [r for r in rows if "val_loss" in r]
        train_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=run.name, alpha=0.7)
        val_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label=run.name)
        tail = [r["loss"] for r in rows[-100:]]
        print(f"| {run.name} | {sum(tail) / len(tail):.4f} | {val[-1]['val_loss']:.4f} |")
    for ax, title in ((train_ax, "train loss"), (val_ax, "validation loss")):
        ax.set(xlabel="optimizer step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = runs[0].parent / "loss_comparison.png"
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
