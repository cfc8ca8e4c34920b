"""Experiment trackers: TensorBoard event files and Weights & Biases runs, fed by rank 0's Reporter.

Every numeric field of every metrics.jsonl record is logged under the same name at the record's step
(loss, val_loss, lr, grad_norm, tokens/s, MFU, memory: whatever the loop records), the resolved
configuration once, and the run's summary at the end. Both packages are optional
(``pip install 'torchmics[tracking]'``); `check_trackers` runs before any process is spawned.

A resumed run continues where its checkpoint is: TensorBoard is told to drop what an earlier session
logged after that step (its ``purge_step``), and W&B continues the same run (its id is kept in the run
folder) and ignores steps it already has.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from torchmics.train.config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
_INSTALL = "pip install 'torchmics[tracking]'"


def check_trackers(cfg: TrainConfig) -> None:
    """The packages the chosen trackers need are installed, and an online W&B run has credentials."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(f"--tensorboard needs the tensorboard package: {_INSTALL}")
    if not cfg.wandb:
        return
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(f"--wandb needs the wandb package: {_INSTALL}")
    import wandb

    if wandb.setup().settings.mode in ("online", "run"):  # WANDB_MODE, or `wandb offline`'s settings file
        try:
            wandb.login(verify=False)  # finds a key without the network, or raises
        except wandb.errors.UsageError as err:
            raise ValueError(
                f"--wandb: {err} Or set WANDB_MODE=offline: the run is then written to the run folder "
                "and `wandb sync` uploads it later"
            ) from err


class Trackers:
    """The trackers ``cfg`` asks for (possibly none), writing into the run folder ``cfg.out``."""

    def __init__(self, cfg: TrainConfig, config: dict, start: int) -> None:
        out = Path(cfg.out)
        self.tensorboard = _tensorboard(out, config, start) if cfg.tensorboard else None
        project = cfg.wandb_project or os.environ.get("WANDB_PROJECT", "torchmics")
        self.wandb = _wandb(out, project, config) if cfg.wandb else None

    def log(self, records: list[dict]) -> None:
        for record in records:
            scalars = _scalars(record)
            if self.tensorboard is not None:
                for name, value in scalars.items():
                    self.tensorboard.add_scalar(name, value, record["step"])
            if self.wandb is not None:
                self.wandb.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            self.tensorboard.flush()  # a watcher sees each interval as it ends

    def finish(self, summary: dict) -> None:
        """Record the summary and close (W&B writes its final files here)."""
        if self.tensorboard is not None:
            self.tensorboard.add_text("summary", _as_markdown(summary))
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.summary.update(_scalars(summary))
            self.wandb.finish()
            # finish() can return before W&B's service has written the run file's tail; stopping the
            # service flushes it, so the run folder is complete (for `wandb sync`) when this returns.
            import wandb

            wandb.teardown()


def _scalars(record: dict) -> dict[str, float]:
    """The numeric, finite fields other than the step (a missing MFU is None; a diverged loss is inf)."""
    return {
        name: value
        for name, value in record.items()
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def _as_markdown(values: dict) -> str:
    """TensorBoard renders text as Markdown: a code block keeps the JSON's layout."""
    return "```json\n" + json.dumps(values, indent=2, default=str) + "\n```"


def _tensorboard(out: Path, config: dict, start: int):
    from torch.utils.tensorboard import SummaryWriter

    # Records are logged at step >= 1; purge_step = start + 1 drops an earlier session's steps after start.
    writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=start + 1 if start else None)
    writer.add_text("config", _as_markdown(config), global_step=start)
    return writer


def _wandb(out: Path, project: str, config: dict):
    import wandb

    id_file = out / WANDB_ID_FILE  # a resumed session continues the first session's run
    run = wandb.init(
        project=project,
        name=out.name,
        id=id_file.read_text() if id_file.exists() else None,
        resume="allow",
        dir=str(out),
        config=config,
        # The live progress bar would fill W&B's console log with redraws; metrics go through log().
        settings=wandb.Settings(console="off"),
    )
    id_file.write_text(run.id)
    return run
