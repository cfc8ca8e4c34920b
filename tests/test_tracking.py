"""TensorBoard and W&B trackers: what they write, read back with each tool's own reader; their errors."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import wandb
from logged_scalars import tensorboard_scalars, tensorboard_text, wandb_config, wandb_history, wandb_records

from torchmics.cli import main
from torchmics.train import tracking
from torchmics.train.config import TrainConfig
from torchmics.train.tracking import Trackers


def _records(steps: range, offset: float = 0.0) -> list[dict]:
    """Records shaped like the loop's: a None MFU (CPU), an inf loss (a skipped step), val_loss now and then."""
    records = []
    for step in steps:
        record = {"step": step, "loss": 10.0 - step + offset, "lr": 1e-3 * step, "mfu": None, "tokens_per_s": 1e5 / 3}
        if step % 2 == 0:
            record["val_loss"] = 9.5 - step + offset
        records.append(record)
    records[-1]["loss"] = float("inf")
    return records


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B without network and without touching the home folder; its process-wide state reset after."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    wandb.teardown()
    yield
    wandb.teardown()


def test_tensorboard_holds_every_finite_scalar_and_the_config(tmp_path):
    cfg = TrainConfig(model="tiny", out=str(tmp_path), tensorboard=True)
    trackers = Trackers(cfg, {"model": "tiny", "world_size": 4}, start=0)
    records = _records(range(1, 6))
    trackers.log(records[:2])
    trackers.log(records[2:])
    trackers.finish({"final_loss": 5.0, "final_val_loss": None})
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss", "lr", "tokens_per_s", "val_loss"}  # None and inf are not logged
    for name, logged in scalars.items():
        expected = [(r["step"], np.float32(r[name])) for r in records if np.isfinite(r.get(name) or np.nan)]
        assert logged == expected, name
    assert '"world_size": 4' in tensorboard_text(tmp_path / "tensorboard", "config")
    assert '"final_loss": 5.0' in tensorboard_text(tmp_path / "tensorboard", "summary")


def test_tensorboard_of_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
    """Session one logged steps 1-4 but its checkpoint holds step 2; session two logs 3-5 again."""
    cfg = TrainConfig(model="tiny", out=str(tmp_path), tensorboard=True)
    first = Trackers(cfg, {}, start=0)
    first.log(_records(range(1, 5)))
    first.finish({})
    second = Trackers(cfg, {}, start=2)
    second.log(_records(range(3, 6), offset=100.0))
    second.finish({})
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 9.0), (2, 8.0), (3, 107.0), (4, 106.0)]  # step 5's loss is inf
    assert scalars["val_loss"] == [(2, 7.5), (4, 105.5)]


def test_wandb_offline_run_holds_every_record_and_continues_when_resumed(tmp_path, wandb_offline):
    cfg = TrainConfig(model="tiny", out=str(tmp_path / "run"), wandb=True)
    (tmp_path / "run").mkdir()
    records = _records(range(1, 4))
    trackers = Trackers(cfg, {"model": "tiny", "model_info": {"n_layer": 2}}, start=0)
    trackers.log(records)
    trackers.finish({"final_loss": 8.0})
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    expected = {r["step"]: {k: v for k, v in r.items() if k not in ("step", "mfu") and np.isfinite(v)} for r in records}
    assert wandb_history(run_file) == expected
    assert {"model": "tiny", "model_info": {"n_layer": 2}}.items() <= wandb_config(run_file).items()
    (run,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("torchmics", "run")  # the default project; the run folder's name
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    assert run_file.name == f"run-{run_id}.wandb"
    time.sleep(1.1)  # offline run folders are named by the second they start in
    resumed = Trackers(cfg, {}, start=3)
    resumed.log(_records(range(4, 6)))
    resumed.finish({})
    first, second = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert first == run_file and sorted(wandb_history(second)) == [4, 5]  # `wandb sync` joins them into one run


TINY = ["--model", "tiny", "--seq-len", "64"]


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_a_clear_error_before_spawning(package, tmp_path, capsys, monkeypatch, no_spawn):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == package else real(name))
    assert main(["train", *TINY, f"--{package}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--{package} needs the {package} package: pip install 'torchmics[tracking]'" in err, err


def test_online_wandb_without_credentials_is_a_clear_error_before_spawning(tmp_path, capsys, monkeypatch, no_spawn):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb.teardown()
    try:
        assert main(["train", *TINY, "--wandb", "--out", str(tmp_path / "run")]) == 2
    finally:
        wandb.teardown()
    err = capsys.readouterr().err
    assert re.search(r"--wandb: No API key configured.* Or set WANDB_MODE=offline", err), err
