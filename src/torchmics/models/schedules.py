"""Learning-rate schedules that fit the model: the GPT-3 paper's values for its size.

One learning rate does not suit every size: 3e-3 trains the byte-level CPU toys in a few dozen
steps, but it threw the 6.7b preset from loss 11.1 to 26.0 in two steps. Brown et al. 2020 (table
2.1) give each size its peak learning rate; appendix B warms up linearly over the first 375 million
tokens and decays with a cosine to 10% of the peak. `train` uses them when ``--lr``, ``--min-lr`` or
``--warmup`` are not given, with the row picked by parameter count, and prints which values it uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torchmics.models.gpt import PRESETS, build_model


@dataclass(frozen=True)
class GPT3Size:
    """One row of the GPT-3 paper's table 2.1."""

    name: str
    num_params: float
    lr: float


GPT3_SIZES = (
    GPT3Size("Small, 125M", 125e6, 6.0e-4),
    GPT3Size("Medium, 350M", 350e6, 3.0e-4),
    GPT3Size("Large, 760M", 760e6, 2.5e-4),
    GPT3Size("XL, 1.3B", 1.3e9, 2.0e-4),
    GPT3Size("2.7B", 2.7e9, 1.6e-4),
    GPT3Size("6.7B", 6.7e9, 1.2e-4),
    GPT3Size("13B", 13e9, 1.0e-4),
    GPT3Size("175B", 175e9, 0.6e-4),
)
WARMUP_TOKENS = 375e6  # GPT-3 appendix B: linear warmup over the first 375M tokens
FINAL_LR_FRACTION = 0.1  # GPT-3 appendix B: cosine decay to 10% of the peak
MAX_WARMUP_FRACTION = 0.1  # a run shorter than GPT-3's warmup still reaches its peak (after 10% of its steps)
TOY_PRESETS = ("tiny", "small")  # byte-level CPU models, far below GPT-3's sizes: they train at 3e-3
TOY_LR = 3e-3


def gpt3_size(num_params: int) -> GPT3Size:
    """The table row nearest to ``num_params`` (on a log scale: 1.4B is the 1.3B row, not the 2.7B one)."""
    return min(GPT3_SIZES, key=lambda row: abs(math.log(row.num_params / num_params)))


def _num_params(model: str) -> int:
    if model in PRESETS:
        return PRESETS[model].num_params()
    with torch.device("meta"):  # an HF config: count without allocating
        return build_model(model)[1].num_params


def default_lr(model: str) -> tuple[float, str]:
    """The peak learning rate for ``model`` (a preset or ``hf:<config>``) and where it comes from."""
    if model in TOY_PRESETS:
        return TOY_LR, "torchmics' value for the byte-level CPU toys"
    row = gpt3_size(_num_params(model))
    return row.lr, f"GPT-3 table 2.1, {row.name}"


def fill_lrs(model: str, lr: float | None, min_lr: float | None) -> tuple[float, float]:
    """``lr`` and ``min_lr`` with defaults for those not given: the model's peak, and 10% of the peak."""
    lr = default_lr(model)[0] if lr is None else lr
    return lr, FINAL_LR_FRACTION * lr if min_lr is None else min_lr


def default_warmup(steps: int, tokens_per_step: int) -> int:
    """GPT-3's 375M warmup tokens in optimizer steps, but at most 10% of the run (and at least one step)."""
    return max(1, min(math.ceil(WARMUP_TOKENS / tokens_per_step), int(MAX_WARMUP_FRACTION * steps)))


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``, which the last of
    ``steps`` steps trains with (the printed plan's "at step N" counts from 1, as the progress lines do)."""

    lr: float
    min_lr: float
    warmup: int
    steps: int

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - 1 - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule(model: str, lr: float, min_lr: float, warmup: int | None, steps: int, tokens_per_step: int) -> Schedule:
    """The run's schedule; ``warmup=None`` takes :func:`default_warmup` for this many tokens per step."""
    return Schedule(lr, min_lr, default_warmup(steps, tokens_per_step) if warmup is None else warmup, steps)


def describe(model: str, sched: Schedule, warmup_given: bool, tokens_per_step: int) -> str:
    """One line for the printed plan: the values used and where each comes from."""
    table_lr, source = default_lr(model)
    lr_from = source if math.isclose(sched.lr, table_lr) else f"--lr; {source} gives {table_lr:.1e}"
    gpt3_steps = math.ceil(WARMUP_TOKENS / tokens_per_step)
    if warmup_given:
        warmup_from = "--warmup"
    elif sched.warmup < gpt3_steps:
        warmup_from = f"GPT-3's 375M tokens would be {gpt3_steps} steps; capped at 10% of --steps"
    else:
        warmup_from = "GPT-3's 375M tokens"
    return (f"lr {sched.lr:.1e} ({lr_from}), cosine to {sched.min_lr:.1e} at step {sched.steps}, "
            f"warmup {sched.warmup} step{'' if sched.warmup == 1 else 's'} ({warmup_from})")
