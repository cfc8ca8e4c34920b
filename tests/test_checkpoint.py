"""Checkpoints: exact resume, resharding, crash-safe saves, clear errors, export without the cluster."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

import torchmics
from dist_utils import run_ranks
from toy import WIDTH, PartlyUsedToyModel, ToyBlock, ToyModel, accumulate, make_batches
from torchmics.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from torchmics.export import export_checkpoint

STEPS, RESUME_AT, ACCUM = 4, 2, 2
BATCHES = make_batches(STEPS, ACCUM, global_batch=8)  # batch 8 splits evenly over 2, 4 and 8 ranks
EXTRA = {"data_position": RESUME_AT, "note": "toy"}


# ---- what runs on every rank ---------------------------------------------------------------------


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)


def _sharded(topo: torchmics.Topology, build: Callable[[], nn.Module] = ToyModel, optimizer=_adamw):
    torch.manual_seed(0)
    model = torchmics.shard(build(), topo)
    return model, optimizer(model)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    """Optimizer steps on ``BATCHES[step]`` (step-indexed data, so a resumed job sees the same batches)."""
    losses = []
    for step in steps:
        total = accumulate(model, BATCHES[step])
        torchmics.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    return losses


def _seed_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _draw_rngs() -> tuple:
    return torch.rand(2).tolist(), random.random(), float(np.random.rand())


def _error(fn: Callable[[], object]) -> str | None:
    try:
        fn()
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        return f"{type(err).__name__}: {err}"
    return None


def _uninterrupted(run_dir: str) -> dict:
    """4 ranks, partition 2: train all steps, saving at RESUME_AT and STEPS; misuse and a crash between."""
    model, opt = _sharded(torchmics.init_mesh(partition_size=2, gpus_per_node=4))
    losses = _train(model, opt, range(RESUME_AT))
    _seed_rngs(100 + dist.get_rank())  # distinct streams per rank: resuming must restore each rank's own
    save_checkpoint(checkpoint_path(run_dir, RESUME_AT), model, opt, step=RESUME_AT, extra=EXTRA)
    out = {"draws_after_save": _draw_rngs()}
    out["overwrite"] = _error(lambda: save_checkpoint(checkpoint_path(run_dir, RESUME_AT), model, opt, step=0))
    bad_extra = {"loss": torch.ones(())}
    out["bad_extra"] = _error(lambda: save_checkpoint(checkpoint_path(run_dir, 9), model, opt, step=9, extra=bad_extra))
    out["bad_step"] = _error(lambda: save_checkpoint(checkpoint_path(run_dir, 8), model, opt, step="8"))
    foreign = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    out["foreign_optimizer"] = _error(lambda: save_checkpoint(checkpoint_path(run_dir, 7), model, foreign, step=7))
    # A crash after every rank wrote its shards, before DCP's index and torchmics.json exist.
    with mock.patch.object(FileSystemWriter, "finish", side_effect=OSError("simulated crash")):
        out["crash"] = _error(lambda: save_checkpoint(checkpoint_path(run_dir, 3), model, opt, step=3))
    out["latest_after_crash"] = latest_checkpoint(run_dir)
    losses += _train(model, opt, range(RESUME_AT, STEPS))
    save_checkpoint(checkpoint_path(run_dir, STEPS), model, opt, step=STEPS, extra=EXTRA)
    return {**out, "losses": losses, "state": torchmics.full_state_dict(model)}


def _resume(run_dir: str, partition: int, gpus_per_node: int) -> dict:
    """Load the RESUME_AT checkpoint into a fresh job of any shape and train to the end."""
    topo = torchmics.init_mesh(partition_size=partition, gpus_per_node=gpus_per_node)
    model, opt = _sharded(topo)
    _seed_rngs(7 + dist.get_rank())
    meta = load_checkpoint(checkpoint_path(run_dir, RESUME_AT), model, opt)
    draws = _draw_rngs()
    losses = _train(model, opt, range(meta["step"], STEPS))
    state = torchmics.full_state_dict(model)
    return {"meta": meta, "draws": draws, "losses": losses, "state": state, "hierarchical": topo.hierarchical}


def _wider_shared() -> nn.Module:
    model = ToyModel()
    model.shared = nn.Linear(WIDTH, WIDTH + 1, bias=False)
    return model


def _extra_block() -> nn.Module:
    model = ToyModel()
    model.blocks.append(ToyBlock())
    return model


def _misuse_then_resume(run_dir: str, incomplete: list[str]) -> dict:
    """Bad loads must raise on every rank and leave the model as it was; then an exact resume."""
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=4)
    errors = {"missing": _error(lambda: load_checkpoint(checkpoint_path(run_dir, 99), _sharded(topo)[0]))}
    errors |= {path: _error(lambda p=path: load_checkpoint(p, _sharded(topo)[0])) for path in incomplete}
    untouched, fresh_optimizer = {}, {}
    cases = {"shape": (_wider_shared, _adamw), "names": (_extra_block, _adamw), "optimizer": (ToyModel, _sgd)}
    for name, (build, optimizer) in cases.items():
        model, opt = _sharded(topo, build, optimizer)
        before = torchmics.full_state_dict(model)
        errors[name] = _error(lambda m=model, o=opt: load_checkpoint(checkpoint_path(run_dir, RESUME_AT), m, o))
        after = torchmics.full_state_dict(model)
        untouched[name] = all(torch.equal(before[k], after[k]) for k in before)
        fresh_optimizer[name] = not opt.state
    model, _ = _sharded(topo)
    load_checkpoint(checkpoint_path(run_dir, RESUME_AT), model)  # weights only, no optimizer
    weights = torchmics.full_state_dict(model)
    checks = {"errors": errors, "untouched": untouched, "fresh_optimizer": fresh_optimizer, "weights_only": weights}
    return checks | _resume(run_dir, 2, 4)


def _save_hf(config_dir: str, run_dir: str) -> dict:
    """A tied-embedding Hugging Face model, sharded over 2 ranks and saved with its spec."""
    from transformers import AutoConfig, AutoModelForCausalLM

    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    model, opt = _sharded(topo, lambda: AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)))
    save_checkpoint(checkpoint_path(run_dir, 0), model, opt, step=0, extra={"model": f"hf:{config_dir}"})
    return torchmics.full_state_dict(model)


def _assert_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# ---- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    return run_dir, run_ranks(_uninterrupted, 4, run_dir)


def test_save_layout_and_metadata(uninterrupted):
    run_dir, _ = uninterrupted
    ckpt = checkpoint_path(run_dir, RESUME_AT)
    files = {os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs}
    expected_shards = {f"__{r}_0.distcp" for r in range(4)} | {f"rng/rank{r}.pt" for r in range(4)}
    assert files == expected_shards | {".metadata", "torchmics.json"}  # every rank wrote its own shards
    with open(os.path.join(ckpt, "torchmics.json")) as f:
        meta = json.load(f)
    assert (meta["step"], meta["extra"]) == (RESUME_AT, EXTRA)
    assert (meta["world_size"], meta["partition_size"], meta["gpus_per_node"]) == (4, 2, 4)
    assert meta["torch_version"] == torch.__version__
    assert meta["shapes"] == {k: list(v.shape) for k, v in ToyModel().state_dict().items()}
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, STEPS)


def test_refuses_overwrite_and_unserializable_extra_on_every_rank(uninterrupted):
    run_dir, results = uninterrupted
    for result in results:
        assert result["overwrite"].startswith("FileExistsError") and "already exists" in result["overwrite"]
        assert result["bad_extra"].startswith("TypeError") and "JSON" in result["bad_extra"]
        assert "save_checkpoint(step='8')" in result["bad_step"]
        assert "parameters that are not this model's" in result["foreign_optimizer"]
    assert not any(name.startswith(("step_7", "step_8")) for name in os.listdir(run_dir))  # nothing written


def test_crash_mid_save_keeps_previous_checkpoint(uninterrupted, tmp_path):
    run_dir, results = uninterrupted
    for result in results:
        assert result["crash"].startswith("RuntimeError") and "simulated crash" in result["crash"]
        assert result["latest_after_crash"] == checkpoint_path(run_dir, RESUME_AT)
    leftovers = [name for name in os.listdir(run_dir) if name.startswith("step_3")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]  # never renamed to step_3
    assert not any(name.startswith("step_9") for name in os.listdir(run_dir))  # bad extra: nothing written
    with pytest.raises(ValueError, match="is an interrupted save, not a checkpoint: use a complete checkpoint"):
        export_checkpoint(os.path.join(run_dir, leftovers[0]), str(tmp_path / "model.safetensors"))


def test_latest_checkpoint_pointer_and_fallback(tmp_path):
    assert latest_checkpoint(str(tmp_path / "no-run-yet")) is None
    for name in ("step_1", "step_10", "step_20", "step_30.tmp-abc"):
        (tmp_path / name).mkdir()
    for name in ("step_1", "step_10", "step_30.tmp-abc"):  # step_20 lacks its metadata: incomplete
        (tmp_path / name / "torchmics.json").write_text("{}")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_10")  # no pointer: scan
    (tmp_path / "latest").write_text("step_1")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_1")  # the pointer wins
    (tmp_path / "latest").write_text("step_20")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_10")  # pointer at an incomplete one


def test_exact_resume_and_load_errors(uninterrupted, tmp_path):
    run_dir, reference = uninterrupted
    no_metadata = str(tmp_path / "step_5")
    shutil.copytree(checkpoint_path(run_dir, RESUME_AT), no_metadata, ignore=shutil.ignore_patterns("torchmics.json"))
    temp = next(os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.startswith("step_3.tmp-"))
    results = run_ranks(_misuse_then_resume, 4, run_dir, [no_metadata, temp])
    for rank, (result, ref) in enumerate(zip(results, reference)):
        errors = result["errors"]
        assert errors["missing"].startswith("FileNotFoundError") and "no checkpoint" in errors["missing"]
        assert "is not a complete checkpoint (no torchmics.json in it" in errors[no_metadata]
        assert "is an interrupted save, not a checkpoint" in errors[temp]
        assert "shared.weight: checkpoint [13, 13] vs model [14, 13]" in errors["shape"]
        assert "blocks.3.norm.weight: model [13], not in the checkpoint" in errors["names"]
        assert errors["optimizer"].startswith("ValueError") and "needs momentum_buffer" in errors["optimizer"]
        assert all(result["untouched"].values())  # checked before reading: the model is never half-loaded
        assert result["fresh_optimizer"]["shape"] and result["fresh_optimizer"]["names"]
        assert result["meta"] == {"step": RESUME_AT, "extra": EXTRA}
        assert result["draws"] == ref["draws_after_save"], f"rank {rank}: RNG state not restored"
        assert result["losses"] == ref["losses"][RESUME_AT:]  # bitwise
    _assert_equal(results[0]["state"], reference[0]["state"])
    export_checkpoint(checkpoint_path(run_dir, RESUME_AT), str(tmp_path / "model.safetensors"))
    _assert_equal(results[0]["weights_only"], load_file(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(
    "world,nodes,partition",
    [(2, 1, 2), (4, 1, 4), (8, 4, 4)],
    ids=["2-ranks-p2", "4-ranks-p4", "4x2-p4-hierarchical"],
)
def test_load_reshards_to_another_world_or_partition(uninterrupted, world, nodes, partition):
    run_dir, reference = uninterrupted
    results = run_ranks(_resume, world, run_dir, partition, world // nodes, nodes=nodes)
    assert results[0]["hierarchical"] == (nodes == 4)
    assert results[0]["losses"] == pytest.approx(reference[0]["losses"][RESUME_AT:], rel=1e-5)
    state = results[0]["state"]
    for name, expected in reference[0]["state"].items():
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for rank, result in enumerate(results):  # RNG streams are per rank: restored only on the same world size
        _seed_rngs(7 + rank)
        assert result["draws"] == (reference[rank]["draws_after_save"] if world == 4 else _draw_rngs())


def test_export_equals_full_state_dict(uninterrupted, tmp_path):
    run_dir, reference = uninterrupted
    full = reference[0]["state"]
    torch.manual_seed(0)
    initial = ToyModel().state_dict()
    assert full.keys() == initial.keys()  # tied head, frozen parameter and buffer all present
    assert torch.equal(full["head.weight"], full["embed.weight"])
    assert torch.equal(full["frozen_bias"], initial["frozen_bias"])
    assert torch.equal(full["position_scale"], initial["position_scale"])
    export_checkpoint(latest_checkpoint(run_dir), str(tmp_path / "model.safetensors"))
    export_checkpoint(latest_checkpoint(run_dir), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]  # not an hf: model: no config
    _assert_equal(load_file(tmp_path / "model.safetensors"), full)
    _assert_equal(load_file(tmp_path / "out" / "model.safetensors"), full)


def test_export_hf_model_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=37, n_embd=16, n_layer=2, n_head=4, n_positions=32)
    config.save_pretrained(tmp_path / "config")
    full = run_ranks(_save_hf, 2, str(tmp_path / "config"), str(tmp_path / "run"))[0]
    export_checkpoint(latest_checkpoint(str(tmp_path / "run")), str(tmp_path / "hf"))
    _assert_equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict(), full)


def _replica_sharded_round_trip(run_dir: str, out_dir: str) -> dict:
    """Plain checkpoint -> ReplicaShardedOptimizer -> its own checkpoint -> plain optimizer again."""
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=4)
    torch.manual_seed(0)
    model = torchmics.shard(ToyModel(), topo, shard_optimizer_across_replicas=True)
    opt = torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    load_checkpoint(checkpoint_path(run_dir, RESUME_AT), model, opt)
    save_checkpoint(checkpoint_path(out_dir, RESUME_AT), model, opt, step=RESUME_AT)
    sharded_losses = _train(model, opt, range(RESUME_AT, STEPS))
    plain_model, plain_opt = _sharded(topo)
    load_checkpoint(checkpoint_path(out_dir, RESUME_AT), plain_model, plain_opt)
    plain_losses = _train(plain_model, plain_opt, range(RESUME_AT, STEPS))
    return {"sharded": sharded_losses, "plain": plain_losses, "state": torchmics.full_state_dict(plain_model)}


def test_replica_sharded_optimizer_checkpoints_interchange_with_plain(uninterrupted, tmp_path):
    run_dir, reference = uninterrupted
    result = run_ranks(_replica_sharded_round_trip, 4, run_dir, str(tmp_path))[0]
    expected = reference[0]["losses"][RESUME_AT:]
    assert result["sharded"] == pytest.approx(expected, rel=1e-5)
    assert result["plain"] == pytest.approx(expected, rel=1e-5)
    for name, value in reference[0]["state"].items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _partly_used_resume(run_dir: str, over_replicas: bool) -> dict:
    """Parameters that never get a gradient have no optimizer state: saving and resuming still works."""
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)

    def build():
        torch.manual_seed(0)
        model = torchmics.shard(PartlyUsedToyModel(), topo, shard_optimizer_across_replicas=over_replicas)
        opt = torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=1e-2) if over_replicas else _adamw(model)
        return model, opt

    model, opt = build()
    losses = _train(model, opt, range(RESUME_AT))
    save_checkpoint(checkpoint_path(run_dir, RESUME_AT), model, opt, step=RESUME_AT)
    losses += _train(model, opt, range(RESUME_AT, STEPS))
    resumed_model, resumed_opt = build()
    load_checkpoint(checkpoint_path(run_dir, RESUME_AT), resumed_model, resumed_opt)
    resumed = _train(resumed_model, resumed_opt, range(RESUME_AT, STEPS))
    return {"losses": losses, "resumed": resumed, "state": torchmics.full_state_dict(model),
            "resumed_state": torchmics.full_state_dict(resumed_model)}


@pytest.mark.parametrize("over_replicas", [False, True], ids=["plain-adamw", "replica-sharded"])
def test_resume_with_parameters_that_never_had_a_gradient(tmp_path, over_replicas):
    result = run_ranks(_partly_used_resume, 4, str(tmp_path), over_replicas, nodes=2)[0]
    assert result["resumed"] == result["losses"][RESUME_AT:]
    _assert_equal(result["resumed_state"], result["state"])
