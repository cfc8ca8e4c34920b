"""What one failure costs, with and without fault-tolerant replica groups (`train --fault-tolerant`).

Without fault tolerance a dead GPU stops all ``W`` GPUs: torchrun restarts the job, which resumes from
the last checkpoint, so every GPU loses the restart and the steps since that checkpoint, half an
interval on average (failures come at random times). With fault tolerance only the failed partition
group's ``P`` GPUs stop: they lose their restart, then copy the state from a live group (a transfer of
the group's model states, counted here as part of the restart) and rejoin at a step boundary; the
survivors lose no step (they train on with a smaller global batch while the group is away). With a
single partition group (P = world) there is no live group to copy from: fault tolerance saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FailureCost:
    """GPU-hours lost to one failure, both ways, and the steps every GPU redoes without fault tolerance (with it: 0)."""

    without_ft_gpu_hours: float
    with_ft_gpu_hours: float
    redone_steps_without_ft: float

    @property
    def saving(self) -> float:
        """How many times fewer GPU-hours fault tolerance loses per failure."""
        return self.without_ft_gpu_hours / self.with_ft_gpu_hours


def failure_cost(world: int, partition_size: int, step_s: float, checkpoint_every: int, restart_s: float) -> FailureCost:
    """Expected GPU-hours lost to one failure on ``world`` GPUs in partition groups of ``partition_size``.

    ``step_s`` is the step time, ``checkpoint_every`` the steps between checkpoints, ``restart_s`` the
    time from the failure to the restarted ranks' first step (detection, scheduling, start-up).
    """
    if world < 1 or partition_size < 1 or world % partition_size:
        raise ValueError(f"partition size {partition_size} must divide the world size {world}")
    if step_s <= 0 or checkpoint_every < 1 or restart_s <= 0:
        raise ValueError(f"need step_s > 0, checkpoint_every >= 1 and restart_s > 0, got {step_s}, "
                         f"{checkpoint_every}, {restart_s}")
    redone = checkpoint_every / 2
    without = world * (redone * step_s + restart_s) / 3600
    if partition_size == world:  # the only group restarts from the checkpoint either way
        return FailureCost(without, without, redone)
    return FailureCost(without, partition_size * restart_s / 3600, redone)


def describe(cost: FailureCost, world: int, partition_size: int, checkpoint_every: int, restart_s: float) -> str:
    """The plan's lines on failures: both costs, and what they assume."""
    without = (
        f"**One failure** (checkpoint every {checkpoint_every} steps, {restart_s:.0f} s restart): without fault "
        f"tolerance all {world} GPUs redo {cost.redone_steps_without_ft:g} steps on average and wait for the "
        f"restart, {cost.without_ft_gpu_hours:.2f} GPU-hours lost; "
    )
    if partition_size == world:
        return without + (f"`train --fault-tolerant` (torchft) loses as much: at P = {partition_size} = world there "
                          "is one partition group, and no live group to recover from (it needs P < world).")
    return without + (
        f"with `train --fault-tolerant` (torchft) only the "
        f"failed partition group's {partition_size} GPUs lose their restart, {cost.with_ft_gpu_hours:.2f} GPU-hours "
        f"({cost.saving:.0f}x less), and the surviving groups lose 0 steps (the global batch shrinks while it is away)."
    )
