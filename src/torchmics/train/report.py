"""What a training run shows and leaves behind: the plan, live progress, metrics.jsonl, loss.png.

Only rank 0 reports; the other ranks get a disabled `Reporter` so the loop has no rank checks. The
loop hands over one log interval at a time (see :mod:`torchmics.train.meter`): one record per step,
whose time fields are the interval's averages. The summary's speed is the median over this session's
steps after its first interval (which includes compilation and warm-up), as bench skips warm-up steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from torchmics.dtypes import replica_hop_format
from torchmics.models import schedules
from torchmics.models.gpt import ModelInfo
from torchmics.plan.strategy import Strategy
from torchmics.quantized import Quantized
from torchmics.sharding import shard_state
from torchmics.tables import read_jsonl
from torchmics.topology import Topology
from torchmics.train.config import TrainConfig
from torchmics.train.tracking import Trackers

GiB, MiB = 2**30, 2**20
LAUNCHED_AT_ENV = "TORCHMICS_LAUNCHED_AT"  # wall-clock time the command started, set by `torchmics train`


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
        self.session: list[list[dict]] = []  # this session's intervals, each a list of records
        if not enabled:
            return
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records = keep_records_until(self.out / "metrics.jsonl", start)
        self.metrics = (self.out / "metrics.jsonl").open("a")
        # soft_wrap: a line written to a log file stays one line, whatever width rich assumes there.
        self.console = Console(highlight=False, soft_wrap=True)
        self.started = time.perf_counter()
        config = self._write_config(topo, source)
        self._print_plan(topo, source, model)
        self.trackers = Trackers(cfg, config, start)  # TensorBoard / W&B, if asked for
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

    def _write_config(self, topo: Topology, source: str) -> dict:
        config = dataclasses.asdict(self.cfg) | {
            "partition_size": topo.partition_size,
            "world_size": topo.world_size,
            "gpus_per_node": topo.gpus_per_node,
            "data_source": source,
            "model_info": dataclasses.asdict(self.info),
        }
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return config

    def _print_plan(self, topo: Topology, source: str, model: nn.Module) -> None:
        shards = topo.num_replicas if self.cfg.optimizer_over_replicas else 1
        info, state = self.info, model_state_bytes(model, shards)
        full = 4 * 4 * info.num_params
        self.console.print(f"[bold]torchmics train[/bold]  model {info.name}: {info.num_params / 1e6:.2f}M params, "
                           f"{info.n_layer} layers, d_model {info.d_model}, seq {info.seq_len}")
        self.console.print(f"topology  {topo.describe()}")
        kept = self._gathering(topo, model)
        self.console.print(f"memory    model states per rank {state / MiB:.1f} MiB (params + grads + AdamW, "
                           f"of {full / MiB:.1f} MiB in all){kept}")
        self.console.print(f"precision {self._precision(topo)}")
        self.console.print(f"data      {source}; {self.cfg.micro_batch} seq/rank x {topo.world_size} ranks x "
                           f"{self.cfg.accum} micro-steps per step")
        self.console.print(f"output    {self.out}")

    def _gathering(self, topo: Topology, model: nn.Module) -> str:
        """Where the planner keeps units gathered from forward to backward, train does unless that copy
        would not fit (train/resolve.py): say which."""
        if not shard_state(model).reshard_after_forward:
            return "; every unit stays gathered from forward to backward"
        if Strategy("mics", cpu_offload=self.cfg.cpu_offload).keeps_gathered(topo.partition_size):
            return "; units resharded after forward: keeping them gathered would not fit"
        return ""

    def _precision(self, topo: Topology) -> str:
        """Compute dtype and what each gradient hop sends: the replica hop is the one on the slow links."""
        cfg = self.cfg
        partition = "fp32 partition-group reduction"
        if topo.num_replicas == 1:
            return f"{cfg.mixed_precision} compute, {partition}; no replica hop (one replica)"
        hop = cfg.replica_reduce_dtype or "fp32"
        fmt = replica_hop_format(cfg.replica_reduce_dtype, cfg.error_feedback)  # what train shards with
        if isinstance(fmt, Quantized):
            feedback = "with error feedback" if fmt.error_feedback else "without error feedback"
            hop = f"{hop} blocks of {fmt.block_size} with fp32 scales, {feedback}"
        return f"{cfg.mixed_precision} compute, {partition}; replica hop {hop}"

    def show_startup(self, weights: str, setup_s: float) -> None:
        """Where the weights came from and how long it took to be ready: the time to the first step."""
        if not self.enabled:
            return
        offload = "; model states in host memory (--cpu-offload)" if self.cfg.cpu_offload else ""
        self.console.print(f"weights   {weights}{offload}")
        launched = os.environ.get(LAUNCHED_AT_ENV)
        since_launch = f", {time.time() - float(launched):.1f} s after launch" if launched else ""
        self.console.print(f"startup   built, sharded, initialized and ready to train in {setup_s:.1f} s{since_launch}")

    def show_schedule(self, schedule: schedules.Schedule, tokens_per_step: int) -> None:
        """The plan's learning-rate line: the values used and where each comes from."""
        if self.enabled:
            line = schedules.describe(self.cfg.model, schedule, self.cfg.warmup is not None, tokens_per_step)
            self.progress.console.print(f"schedule  {line}")

    def log(self, records: list[dict]) -> None:
        """One log interval: its records go to metrics.jsonl, its last one to the progress line."""
        if not self.enabled or not records:
            return
        self.records += records
        self.session.append(records)
        self.metrics.writelines(json.dumps(r) + "\n" for r in records)
        self.metrics.flush()
        self.trackers.log(records)
        last = records[-1]
        status = f"loss {last['loss']:.4f}  {_speed(last['tokens_per_s_per_gpu'], last['mfu'])}  " \
                 f"{last['peak_mem_bytes'] / GiB:.1f} GiB"
        self.progress.update(self.task, completed=last["step"], status=status)
        if "val_loss" in last or not self.console.is_terminal:
            val = f"  val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""
            self.progress.console.print(f"step {last['step']:>6}  {status}  lr {last['lr']:.2e}{val}")

    def stop(self, message: str) -> None:
        """End a run that cannot go on: say why in one line, then close the outputs as `finish` does."""
        if self.enabled:
            self.progress.console.print(f"[bold red]stopped[/bold red]: {message}")
            self.finish(headline="[bold red]stopped[/bold red] after")

    def finish(self, headline: str = "[bold]done[/bold] in") -> dict:
        """Close outputs, draw the loss curve, print and return the summary of the whole run (rank 0; {} elsewhere).

        The whole run includes the steps of earlier sessions of a resumed run (they are in metrics.jsonl);
        its speed is this session's (see the module docstring).
        """
        if not self.enabled:
            return {}
        self.progress.stop()
        self.metrics.close()
        if not self.records:  # resumed at or past --steps into an --out without metrics: nothing ran
            self.console.print(f"[bold]done[/bold]: the checkpoint already holds all {self.cfg.steps} steps")
            self.trackers.finish({})
            return {}
        last_val = [r["val_loss"] for r in self.records if "val_loss" in r]
        summary = {
            "steps": self.records[-1]["step"],
            "first_loss": self.records[0]["loss"],
            "final_loss": self.records[-1]["loss"],
            "final_val_loss": last_val[-1] if last_val else None,
        }
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        val = "n/a" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4f}"
        speed = ""
        if self.session:  # empty when a resumed run had no steps left
            summary |= self._speed_summary()
            first, last = summary.pop("timed_steps")
            speed = (f"{_speed(summary['tokens_per_s_per_gpu'], summary['mfu'])} (median of {_steps(first, last)}; "
                     f"{summary['tokens_per_s']:,.0f} tok/s in all), "
                     f"peak memory {summary['peak_mem_bytes'] / GiB:.2f} GiB per rank; ")
        self.console.print(
            f"{headline} {time.perf_counter() - self.started:.0f} s: loss {summary['first_loss']:.4f} -> "
            f"{summary['final_loss']:.4f}, val {val}, {speed}see {self.out}/metrics.jsonl and loss.png"
        )
        self.trackers.finish(summary)
        return summary

    def _speed_summary(self) -> dict:
        """Medians over this session's steps after its first interval (all of them if there was only one)."""
        timed = [r for interval in self.session[1:] or self.session for r in interval]
        medians = {key: _median(timed, key) for key in ("tokens_per_s", "tokens_per_s_per_gpu", "mfu", "step_time_s")}
        return medians | {"timed_steps": (timed[0]["step"], timed[-1]["step"]),
                          "peak_mem_bytes": max(r["peak_mem_bytes"] for r in timed)}


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _speed(tokens_per_s_per_gpu: float, mfu: float | None) -> str:
    return f"{tokens_per_s_per_gpu:,.0f} tok/s/GPU" + ("" if mfu is None else f"  MFU {100 * mfu:.1f}%")


def _median(records: list[dict], key: str) -> float | None:
    """The median of ``key`` over records that have it (None if none: MFU on a device without a known peak)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def keep_records_until(metrics_path: Path, step: int) -> list[dict]:
    """Rewrite metrics.jsonl (atomically) with only the records of steps ``<= step``; return them."""
    kept = [r for r in read_jsonl(metrics_path, missing_ok=True) if r["step"] <= step]
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

    records = read_jsonl(metrics_path, missing_ok=True)
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
