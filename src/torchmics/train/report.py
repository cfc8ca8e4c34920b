"""What a training run shows and leaves behind: the plan, live progress, metrics.jsonl, loss.png.

Only rank 0 reports; the other ranks get a disabled `Reporter` so the loop has no rank checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from torchmics.models.gpt import ModelInfo
from torchmics.topology import Topology
from torchmics.train.config import TrainConfig

GiB, MiB = 2**30, 2**20


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_state_bytes(model: nn.Module, optimizer_shards: int = 1) -> int:
    """This rank's bytes of parameters + gradients + AdamW's two moments (all in the master dtype).

    ``optimizer_shards`` is how many replicas split the moments (``--optimizer-over-replicas``).
    """
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * local + 2 * local // optimizer_shards


class Reporter:
    """Rank 0's outputs. ``start`` is the step a resumed run continues from (0 for a fresh run).

    A resumed run continues ``metrics.jsonl``: records after ``start`` came from steps the checkpoint
    does not hold (the job died after logging them) and are dropped, so every step appears once.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        topo: Topology,
        info: ModelInfo,
        source: str,
        model: nn.Module,
        enabled: bool,
        start: int = 0,
        resumed_from: str | None = None,
    ):
        self.enabled, self.cfg, self.info = enabled, cfg, info
        self.records: list[dict] = []
        if not enabled:
            return
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records = keep_records_until(self.out / "metrics.jsonl", start)
        self.metrics = (self.out / "metrics.jsonl").open("a")
        # soft_wrap: a line written to a log file stays one line, whatever width rich assumes there.
        self.console = Console(highlight=False, soft_wrap=True)
        self.started = time.perf_counter()
        self._write_config(topo, source)
        self._print_plan(topo, source, model)
        if resumed_from is not None:
            self.console.print(f"resumed   from {resumed_from} at step {start}")
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.task = self.progress.add_task("train", total=cfg.steps, completed=start, status="")
        self.progress.start()

    def _write_config(self, topo: Topology, source: str) -> None:
        config = dataclasses.asdict(self.cfg) | {
            "partition_size": topo.partition_size,
            "world_size": topo.world_size,
            "gpus_per_node": topo.gpus_per_node,
            "data_source": source,
            "model_info": dataclasses.asdict(self.info),
        }
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _print_plan(self, topo: Topology, source: str, model: nn.Module) -> None:
        shards = topo.num_replicas if self.cfg.optimizer_over_replicas else 1
        info, state = self.info, model_state_bytes(model, shards)
        full = 4 * 4 * info.num_params
        self.console.print(f"[bold]torchmics train[/bold]  model {info.name}: {info.num_params / 1e6:.2f}M params, "
                           f"{info.n_layer} layers, d_model {info.d_model}, seq {info.seq_len}")
        self.console.print(f"topology  {topo.describe()}")
        self.console.print(f"memory    model states per rank {state / MiB:.1f} MiB (params + grads + AdamW, "
                           f"of {full / MiB:.1f} MiB in all)")
        self.console.print(f"data      {source}; {self.cfg.micro_batch} seq/rank x {topo.world_size} ranks x "
                           f"{self.cfg.accum} micro-steps per step")
        self.console.print(f"output    {self.out}")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        status = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=record["step"], status=status)
        if "val_loss" in record or not self.console.is_terminal and record["step"] % max(1, self.cfg.steps // 15) == 0:
            val = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            self.progress.console.print(f"step {record['step']:>6}  {status}  lr {record['lr']:.2e}{val}")

    def finish(self) -> dict:
        """Close outputs, draw the loss curve, print and return the summary of the whole run (rank 0; {} elsewhere).

        The whole run includes the steps of earlier sessions of a resumed run (they are in metrics.jsonl).
        """
        if not self.enabled:
            return {}
        self.progress.stop()
        self.metrics.close()
        if not self.records:  # resumed at or past --steps into an --out without metrics: nothing ran
            self.console.print(f"[bold]done[/bold]: the checkpoint already holds all {self.cfg.steps} steps")
            return {}
        last_val = [r["val_loss"] for r in self.records if "val_loss" in r]
        summary = {
            "steps": self.records[-1]["step"],
            "first_loss": self.records[0]["loss"],
            "final_loss": self.records[-1]["loss"],
            "final_val_loss": last_val[-1] if last_val else None,
        }
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        rates = [r["tokens_per_s"] for r in self.records[1:]] or [0.0]
        val = "n/a" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4f}"
        self.console.print(
            f"[bold]done[/bold] in {time.perf_counter() - self.started:.0f} s: loss {summary['first_loss']:.4f} -> "
            f"{summary['final_loss']:.4f}, val {val}, "
            f"{sorted(rates)[len(rates) // 2]:,.0f} tok/s (median), "
            f"peak memory {max(r['peak_mem_bytes'] for r in self.records) / GiB:.2f} GiB per rank; "
            f"see {self.out}/metrics.jsonl and loss.png"
        )
        return summary


def read_records(metrics_path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a killed process is skipped, not an error."""
    if not metrics_path.is_file():
        return []
    records = []
    for line in metrics_path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def keep_records_until(metrics_path: Path, step: int) -> list[dict]:
    """Rewrite metrics.jsonl (atomically) with only the records of steps ``<= step``; return them."""
    kept = [r for r in read_records(metrics_path) if r["step"] <= step]
    if metrics_path.exists():
        temp = metrics_path.with_name(metrics_path.name + ".tmp")
        temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        temp.replace(metrics_path)
    return kept


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against step, from metrics.jsonl (so a resumed run plots all of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title=f"{metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
