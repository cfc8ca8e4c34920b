"""Run a function on N gloo ranks (spawned processes) and collect what each rank returns."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from torchmics.launch import LocalLaunch, spawn


def _save_result(out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, nodes: int = 1, timeout_s: float = 240) -> list[Any]:
    """``fn(*args)`` on every rank of a local gloo job of ``nodes`` emulated nodes; results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        spawn(_save_result, LocalLaunch(world_size, nodes), out_dir, fn, args, timeout_s=timeout_s)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
