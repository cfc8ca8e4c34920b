"""Checkpoint integrity: sizes and checksums recorded at save, damage named at load, retention, cleanup, export."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchmics
from dist_utils import run_ranks
from toy import ToyModel, lm_loss, make_batches
from torchmics.checkpoint import (
    DamagedCheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    remove_interrupted_saves,
    save_checkpoint,
    verify_checkpoint,
)
from torchmics.export import export_checkpoint

BATCHES = make_batches(4, 1, global_batch=4)


def _sharded() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torchmics.shard(ToyModel(), torchmics.init_mesh(partition_size=2, gpus_per_node=2))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _save_four(run_dir: str) -> dict:
    """Steps 1-4, each saved with keep=2 and the first checkpoint protected (as a resumed run's source)."""
    model, opt = _sharded()
    for step in range(1, 5):
        lm_loss(model, BATCHES[step - 1][0].chunk(2)[dist.get_rank()]).backward()
        opt.step()
        opt.zero_grad()
        save_checkpoint(checkpoint_path(run_dir, step), model, opt, step=step, keep=2,
                        protect=[checkpoint_path(run_dir, 1)])
    return torchmics.full_state_dict(model)


def _load_each(paths: list[str]) -> dict:
    """Load each checkpoint in a job: the error every rank raised, or the loaded weights and any warnings."""
    outcomes = {}
    for path in paths:
        model, opt = _sharded()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_checkpoint(path, model, opt)
            except DamagedCheckpointError as err:
                outcomes[path] = {"error": str(err)}
                continue
        outcomes[path] = {"state": torchmics.full_state_dict(model), "warnings": [str(w.message) for w in caught]}
    return outcomes


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_ranks(_save_four, 2, str(run_dir))[0]


def _files_on_disk(checkpoint: Path) -> dict[str, dict[str, int]]:
    """Every file but torchmics.json, with its size and the CRC-32 of its bytes read in one go."""
    files = {}
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.name != "torchmics.json":
            data = path.read_bytes()
            files[path.relative_to(checkpoint).as_posix()] = {"size": len(data), "crc32": zlib.crc32(data)}
    return files


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_retention_keeps_the_newest_and_the_protected(saved):
    run_dir, _ = saved
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step_1", "step_3", "step_4"]
    assert (run_dir / "latest").read_text() == "step_4"


def test_every_file_is_recorded_with_its_size_and_checksum(saved):
    run_dir, _ = saved
    recorded = json.loads((run_dir / "step_4" / "torchmics.json").read_text())["files"]
    on_disk = _files_on_disk(run_dir / "step_4")
    assert {"__0_0.distcp", "__1_0.distcp", "rng/rank0.pt", "rng/rank1.pt", ".metadata"} <= on_disk.keys()
    assert recorded == on_disk


def test_damage_is_named_file_by_file(saved, tmp_path):
    checkpoint = _copy(saved[0] / "step_4", tmp_path / "step_4")
    os.truncate(checkpoint / "__0_0.distcp", 100)
    (checkpoint / "rng" / "rank1.pt").unlink()
    with (checkpoint / "__1_0.distcp").open("r+b") as f:  # one byte flipped: same size, other content
        f.seek(50)
        byte = f.read(1)
        f.seek(50)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DamagedCheckpointError) as caught:
        verify_checkpoint(str(checkpoint))
    size = (saved[0] / "step_4" / "__0_0.distcp").stat().st_size
    assert caught.value.problems[0] == f"__0_0.distcp is truncated (100 of {size} bytes)"
    assert caught.value.problems[1].startswith("__1_0.distcp is corrupt (CRC-32 ")
    assert caught.value.problems[2] == "rng/rank1.pt is missing"
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        export_checkpoint(str(checkpoint), str(tmp_path / "model.safetensors"))
    assert not (tmp_path / "model.safetensors").exists()


def test_latest_checkpoint_skips_a_damaged_newest_with_a_warning(saved, tmp_path):
    run_dir = tmp_path / "run"
    for name in ("step_3", "step_4"):
        _copy(saved[0] / name, run_dir / name)
    (run_dir / "latest").write_text("step_4")
    (run_dir / "step_4" / "__1_0.distcp").unlink()
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_4: __1_0.distcp is missing"):
        assert latest_checkpoint(str(run_dir)) == str(run_dir / "step_3")


def test_load_verifies_on_every_rank_and_old_checkpoints_load_unverified(saved, tmp_path):
    run_dir, final_state = saved
    truncated = _copy(run_dir / "step_4", tmp_path / "truncated")
    os.truncate(truncated / "__1_0.distcp", 10)
    old = _copy(run_dir / "step_4", tmp_path / "old")  # as saved before sizes were recorded
    meta = json.loads((old / "torchmics.json").read_text())
    del meta["files"]
    (old / "torchmics.json").write_text(json.dumps(meta))
    results = run_ranks(_load_each, 2, [str(truncated), str(old)])
    for result in results:  # both ranks raise, though only one of them read the truncated file
        assert "__1_0.distcp is truncated (10 of" in result[str(truncated)]["error"]
    loaded = results[0][str(old)]
    assert loaded["warnings"] == []
    for name, tensor in final_state.items():
        assert torch.equal(loaded["state"][name], tensor), name


def test_interrupted_saves_are_removed_and_nothing_else(tmp_path):
    for name in ("step_5.tmp-1a2b3c4d", "step_6", "superseded-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_5.tmp-1a2b3c4d" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "latest.tmp-99").write_text("step_6")
    assert remove_interrupted_saves(str(tmp_path)) == ["latest.tmp-99", "step_5.tmp-1a2b3c4d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_6", "superseded-x"]


def test_export_refuses_an_existing_target_and_is_readable_by_the_group(saved, tmp_path):
    checkpoint = str(saved[0] / "step_4")
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists and is never overwritten"):
        export_checkpoint(checkpoint, str(existing))
    assert existing.read_bytes() == b"precious"
    export_checkpoint(checkpoint, str(tmp_path / "out"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    with pytest.raises(FileExistsError):
        export_checkpoint(checkpoint, str(tmp_path / "out"))
