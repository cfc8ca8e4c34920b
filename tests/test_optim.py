"""ReplicaShardedOptimizer is a torch.optim.Optimizer: schedulers, closures and state dicts work as with any."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import torchmics
from dist_utils import run_ranks
from toy import ToyModel, accumulate, make_batches

STEPS, ACCUM = 3, 2
BATCHES = make_batches(STEPS, ACCUM, global_batch=8)
LR_FACTORS = (1.0, 0.1, 0.0)  # the last step must leave the weights as they are

SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]] = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: LR_FACTORS[step]),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 1),
}


def _build(topo: torchmics.Topology, over_replicas: bool):
    torch.manual_seed(0)
    model = torchmics.shard(ToyModel(), topo, shard_optimizer_across_replicas=over_replicas)
    if over_replicas:
        return model, torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _closure(model: torch.nn.Module, step: int) -> Callable[[], torch.Tensor]:
    """torch's closure contract: recompute the loss of ``step`` (two micro-steps, two-hop) with its backward."""
    return lambda: accumulate(model, BATCHES[step])


def _scheduled_training(topo: torchmics.Topology, over_replicas: bool, schedule: str | None) -> dict:
    model, opt = _build(topo, over_replicas)
    scheduler = SCHEDULES[schedule](opt) if schedule else None
    losses, lrs, states = [], [], []
    inner = opt.inner if over_replicas else opt
    for step in range(STEPS):
        lrs.append((opt.param_groups[0]["lr"], inner.param_groups[0]["lr"]))  # what it shows, what steps use
        losses.append(opt.step(_closure(model, step)).item())
        opt.zero_grad()
        states.append(torchmics.full_state_dict(model))
        if scheduler is not None and step < STEPS - 1:
            scheduler.step()
    return {"losses": losses, "lrs": lrs, "states": states}


def _schedules(partition: int, gpus_per_node: int) -> dict:
    topo = torchmics.init_mesh(partition_size=partition, gpus_per_node=gpus_per_node)
    runs = {}
    for schedule in (*SCHEDULES, None):
        for over_replicas in (True, False):
            runs[schedule, over_replicas] = _scheduled_training(topo, over_replicas, schedule)
    return runs


@pytest.fixture(scope="module")
def schedules():
    return run_ranks(_schedules, 4, 2, 2, nodes=2)[0]  # 2 nodes x 2, partition 2: 2 replicas


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lr_scheduler_sets_the_learning_rate_the_inner_optimizer_uses(schedules, schedule):
    sharded, plain, unscheduled = schedules[schedule, True], schedules[schedule, False], schedules[None, True]
    assert all(shown == used for shown, used in sharded["lrs"])
    assert sharded["lrs"] == plain["lrs"] and len({lr for lr, _ in sharded["lrs"]}) == STEPS
    assert sharded["losses"] == pytest.approx(plain["losses"], rel=1e-5)  # same schedule as a plain optimizer
    assert sharded["losses"][-1] != pytest.approx(unscheduled["losses"][-1], rel=1e-5)
    for name, value in plain["states"][-1].items():
        torch.testing.assert_close(sharded["states"][-1][name], value, rtol=1e-5, atol=1e-6)


def test_a_zero_learning_rate_from_the_scheduler_leaves_the_weights(schedules):
    states = schedules["lambda", True]["states"]
    assert schedules["lambda", True]["lrs"][-1] == (0.0, 0.0)
    for name, value in states[-2].items():
        assert torch.equal(states[-1][name], value), name
    assert not all(torch.equal(states[0][n], states[1][n]) for n in states[0])  # earlier steps did move them


def _round_trip() -> dict:
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    model, opt = _build(topo, over_replicas=True)
    for step in range(2):
        opt.step(_closure(model, step))
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    opt.step(_closure(model, 2))  # the state moves on...
    moved = opt.state_dict()
    opt.load_state_dict(saved)  # ...and comes back
    restored = opt.state_dict()
    fresh_model, fresh = _build(topo, over_replicas=True)
    fresh.load_state_dict(saved)
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg"] = torch.zeros(bad["state"][0]["exp_avg"].numel() + 1)
    try:
        fresh.load_state_dict(bad)
        error = None
    except ValueError as err:
        error = str(err)
    shared = opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    return {"saved": saved, "moved": moved, "restored": restored, "fresh": fresh.state_dict(), "error": error,
            "shared_after_load": shared, "is_optimizer": isinstance(opt, torch.optim.Optimizer)}


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        assert entry.keys() == b["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


def test_state_dict_round_trip():
    for result in run_ranks(_round_trip, 4, nodes=2):
        assert result["is_optimizer"] and result["shared_after_load"]
        assert set(result["saved"]["state"]) <= set(range(len(result["saved"]["param_groups"][0]["params"])))
        moved, saved = result["moved"]["state"], result["saved"]["state"]
        assert not all(torch.equal(moved[i]["exp_avg"], saved[i]["exp_avg"]) for i in saved)
        _assert_state_dicts_equal(result["restored"], result["saved"])
        _assert_state_dicts_equal(result["fresh"], result["saved"])
        assert "does not hold this rank's slices" in result["error"] and "load_checkpoint" in result["error"]
