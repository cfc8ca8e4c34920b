"""The one door to FSDP2's internals: the tested torch range, and the run-time guards of the replica hop."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import pytest
import torch

import torchmics
from torchmics import _fsdp
from dist_utils import run_ranks
from toy import ToyBlock, ToyModel, lm_loss, make_batches

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_oldest_torch_is_the_one_pyproject_requires():
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [minimum] = [re.fullmatch(r"torch>=(\d+)\.(\d+)", d.strip())[0] for d in dependencies if d.startswith("torch")]
    assert minimum == f"torch>={_fsdp.OLDEST_TORCH[0]}.{_fsdp.OLDEST_TORCH[1]}"
    assert _fsdp.check_torch_version(torch.__version__) is None  # the torch under test is a tested one


@pytest.mark.parametrize("version", ["2.10.0", "2.10.1+cpu", "2.11.0a0+git1234", "2.13.0", "2.13.2+cu128"])
def test_tested_releases_pass(version, monkeypatch):
    monkeypatch.delenv(_fsdp.ALLOW_UNTESTED_ENV, raising=False)
    _fsdp.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.9.0", "2.14.0", "3.0.0", "nightly"])
def test_an_untested_release_is_refused_unless_asked_for(version, monkeypatch):
    monkeypatch.delenv(_fsdp.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ImportError, match=rf"tested on torch 2\.10 to 2\.13, but this is torch {re.escape(version)}"):
        _fsdp.check_torch_version(version)
    monkeypatch.setenv(_fsdp.ALLOW_UNTESTED_ENV, "1")
    _fsdp.check_torch_version(version)


def _scenario(name: str, tokens: torch.Tensor) -> str:
    """Two training steps with the replica hop torchmics runs; what they raised ("ok": nothing) on this rank."""
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)  # 2 replicas of 2 ranks
    own_optimizer = name.startswith("optimizer")
    precision = torchmics.MixedPrecision(replica_reduce_dtype=torch.float32)
    torch.manual_seed(0)  # the same weights on every rank
    model = torchmics.shard(ToyModel(), topo, wrap=(ToyBlock,), mixed_precision=precision,
                            shard_optimizer_across_replicas=own_optimizer)
    if own_optimizer:
        optimizer = torchmics.ReplicaShardedOptimizer(model, torch.optim.SGD, lr=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        for step_tokens in tokens:  # each rank its own batch: only the replica hop makes the replicas agree
            lm_loss(model, step_tokens[0, rank::world]).backward()
            optimizer.step()
            optimizer.zero_grad()
    except RuntimeError as err:
        return str(err)
    weights = [p.full_tensor() for p in model.parameters()]
    largest = [w.clone() for w in weights]
    for w in largest:
        torch.distributed.all_reduce(w, op=torch.distributed.ReduceOp.MAX)
    return "ok" if all(torch.equal(a, b) for a, b in zip(weights, largest)) else "replicas differ"


def _every_scenario(names: list[str], tokens: torch.Tensor) -> dict[str, str]:
    results, door = {}, dict(vars(_fsdp))
    for name in names:
        if name.endswith("without hooks"):  # an FSDP2 that no longer calls the sharded parameters' hooks
            _fsdp.register_gradient_hook = lambda param, hook: None
        if name.endswith("compiled autograd"):
            _fsdp.compiled_autograd_active = lambda: True
        results[name] = _scenario(name, tokens)
        vars(_fsdp).update(door)
    return results


def test_the_replica_hop_refuses_to_be_skipped():
    """With the hooks never called, the gradients would silently stay unreduced: both hops raise instead."""
    names = ["plain", "optimizer", "plain without hooks", "optimizer without hooks", "plain compiled autograd"]
    results = run_ranks(_every_scenario, 4, names, make_batches(2, 1, 4), nodes=2)
    assert all(r == results[0] for r in results)
    outcome = results[0]
    assert outcome["plain"] == "ok" and outcome["optimizer"] == "ok"
    for name in ("plain without hooks", "optimizer without hooks"):
        assert "without calling their post-accumulate-grad hooks" in outcome[name], outcome[name]
        assert f"torch {torch.__version__}" in outcome[name]
    assert "compiled autograd" in outcome["plain compiled autograd"], outcome["plain compiled autograd"]


def _single_rank_partitions(tokens: torch.Tensor) -> dict:
    """Two replicas of one rank, bf16 compute and fp32 reduction, two-hop accumulation, an eval forward before
    each step: torchmics (whose units skip FSDP2's world-size-1 copies and stay gathered from forward to
    backward) against plain FSDP2 HSDP on the same mesh, bit for bit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    topo = torchmics.init_mesh(partition_size=1, gpus_per_node=1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    runs = {}
    for system in ("torchmics", "fsdp2"):
        torch.manual_seed(0)
        model = ToyModel()
        if system == "torchmics":
            precision = torchmics.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            model = torchmics.shard(model, topo, wrap=(ToyBlock,), mixed_precision=precision,
                                    reshard_after_forward=False)  # as train runs P = 1
            groups = [unit._get_fsdp_state()._fsdp_param_group for unit in torchmics.sharding.shard_state(model).units]
            skipped = ["wait_for_unshard" in vars(group) for group in groups]  # shard() replaced FSDP2's
        else:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for unit in [*model.blocks, model]:  # resharding every unit, the root too: no copy outlives a step
                fully_shard(unit, mesh=topo.mesh, mp_policy=policy, reshard_after_forward=True)
        with torch.no_grad():  # an eval before the optimizer exists: it must still get the sharded parameters
            losses = [lm_loss(model, tokens[0, 0][rank::world]).item()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for n, step in enumerate(tokens):
            for i, micro in enumerate(step):
                if system == "fsdp2":
                    model.set_requires_all_reduce(i == len(step) - 1)
                sync = torchmics.no_replica_sync(model) if system == "torchmics" and i < len(step) - 1 else None
                with sync or contextlib.nullcontext():
                    loss = lm_loss(model, micro[rank::world])
                    if n == i == 0:
                        kept_gathered = not isinstance(model.blocks[0].mix.weight, DTensor)
                    loss.backward()
                losses.append(loss.item())
            with torch.no_grad():  # an eval before the step: no unit may keep the old weights after it
                losses.append(lm_loss(model, step[0][rank::world]).item())
            optimizer.step()
            optimizer.zero_grad()
        runs[system] = {"losses": losses, "weights": [p.full_tensor() for p in model.parameters()],
                        "kept gathered after forward": kept_gathered}
    runs["skipped"] = skipped
    return runs


def test_a_single_rank_partition_skips_fsdp2s_copies_and_trains_as_fsdp2():
    runs = run_ranks(_single_rank_partitions, 2, make_batches(3, 2, 4))[0]
    assert runs["skipped"] and all(runs["skipped"])  # every unit takes the single-rank path
    ours, fsdp2 = runs["torchmics"], runs["fsdp2"]
    assert ours["losses"] == fsdp2["losses"]
    assert all(torch.equal(a, b) for a, b in zip(ours["weights"], fsdp2["weights"]))
    assert ours["kept gathered after forward"] and not fsdp2["kept gathered after forward"]
