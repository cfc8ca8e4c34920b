"""`torchmics train` and `torchmics export` end to end on CPU: what a user runs, sees and gets.

Full runs go through ``python -m torchmics.cli`` (it spawns its own gloo workers, as for a user);
bad input is tried in this process, with spawning made impossible, to show it fails before any
worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from torchmics.cli import main
from torchmics.models import GPT, causal_lm_loss, get_preset
from torchmics.train import command
from torchmics.train.config import TrainConfig, build_parser, resolve_config
from torchmics.train.data import BatchSampler, load_tokens

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--accum", "2"]
RUN_TIMEOUT_S = 120
METRIC_KEYS = {"step", "loss", "lr", "tokens_per_s", "peak_mem_bytes"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``torchmics ARGS`` in a fresh process, as a user runs it; a hang fails the test instead of blocking it."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torchmics.cli", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)


def _succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- a real run: 4 ranks as 2 emulated nodes, hierarchical partition of 4 -----------------------------


@pytest.fixture(scope="module")
def hierarchical_run(tmp_path_factory) -> tuple[Path, str]:
    """30 steps configured by a TOML file, one of whose keys (steps) a flag overrides."""
    root = tmp_path_factory.mktemp("hierarchical")
    config = root / "run.toml"
    config.write_text(
        'model = "tiny"\nseq_len = 64\nmicro-batch = 2\naccum = 2\nsteps = 1000\neval_every = 10\n'
        "nproc = 4\nemulate_nodes = 2\npartition_size = 4\n"
    )
    out = root / "run"
    result = _succeeded(_cli("train", "--config", str(config), "--steps", "30", "--out", str(out)))
    return out, result.stdout


def test_run_writes_metrics_config_and_plot(hierarchical_run):
    out, _ = hierarchical_run
    metrics = _metrics(out)
    assert [r["step"] for r in metrics] == list(range(1, 31))
    assert all(METRIC_KEYS <= r.keys() and all(np.isfinite(r[k]) for k in METRIC_KEYS) for r in metrics)
    assert [r["step"] for r in metrics if "val_loss" in r] == [10, 20, 30]
    assert (out / "loss.png").stat().st_size > 0


def test_loss_falls(hierarchical_run):
    metrics = _metrics(hierarchical_run[0])
    first, last = np.mean([r["loss"] for r in metrics[:3]]), np.mean([r["loss"] for r in metrics[-3:]])
    assert last < first - 1.0, (first, last)  # bytes start at ln(256) = 5.5; 30 steps reach about 3.5
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert val == sorted(val, reverse=True), val


def test_config_file_is_honoured_and_flags_override_it(hierarchical_run):
    config = json.loads((hierarchical_run[0] / "config.json").read_text())
    assert config["steps"] == 30  # the flag, over the file's 1000
    assert (config["seq_len"], config["micro_batch"], config["eval_every"]) == (64, 2, 10)  # from the file
    assert (config["world_size"], config["gpus_per_node"], config["partition_size"]) == (4, 2, 4)
    assert config["model_info"]["name"] == "tiny" and config["data_source"].startswith("python stdlib sources")


def test_prints_the_hierarchical_topology(hierarchical_run):
    stdout = hierarchical_run[1]
    assert "4 ranks = 2 nodes x 2 per node; partition size 4 (spans 2 nodes, hierarchical" in stdout
    assert "val_loss" in stdout and "done in" in stdout


# ---- checkpoints: 2 ranks on one node, flat partition of 2, saving every 5 steps -------------------

CHECKPOINTED = [*TINY, "--nproc", "2", "--emulate-nodes", "1", "--partition-size", "2", "--steps", "10"]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    flags = [*CHECKPOINTED, "--eval-every", "5", "--checkpoint-every", "5", "--out", str(out)]
    return out, _succeeded(_cli("train", *flags)).stdout


def test_flat_partition_inside_a_node_and_its_checkpoints(checkpointed_run):
    out, stdout = checkpointed_run
    assert re.search(r"2 ranks = 1 node x 2 per node; partition size 2 \(inside one node, flat collectives\)", stdout)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_10", "step_5"]
    assert (out / "latest").read_text() == "step_10"


def test_a_worker_crash_stops_every_worker_and_is_one_line(checkpointed_run, tmp_path):
    """Rank 1 alone fails (its RNG file is missing from a checkpoint saved before file sizes were
    recorded, so nothing notices up front) while rank 0 goes on and blocks in the first all-gather:
    the command must stop both and say what rank 1 raised in one line, its traceback in the run folder."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run[0] / "step_5", out / "step_5")
    metadata = json.loads((out / "step_5" / "torchmics.json").read_text())
    del metadata["files"]
    (out / "step_5" / "torchmics.json").write_text(json.dumps(metadata))
    (out / "step_5" / "rng" / "rank1.pt").unlink()
    result = _cli("train", *CHECKPOINTED, "--resume", "auto", "--out", str(out))
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("torchmics train: error: rank 1 failed: FileNotFoundError: ") and "rank1.pt" in line, line
    assert line.endswith(f"(full traceback in {out / 'error-rank1.log'})"), line
    assert "Traceback (most recent call last)" in (out / "error-rank1.log").read_text()


def test_export_gives_the_trained_weights(checkpointed_run, tmp_path):
    out = checkpointed_run[0]
    target = tmp_path / "model.safetensors"
    assert main(["export", str(out / "step_10"), "--to", str(target)]) == 0
    weights = load_file(target)

    model = GPT(get_preset("tiny"))
    model.load_state_dict(weights, strict=True)  # every key, every shape
    assert all(torch.isfinite(t).all() for t in weights.values())

    dcp_to_torch_save(out / "step_10", tmp_path / "reference.pt")  # torch's own reader of the DCP files
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)["model"]
    assert reference.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)

    # The loss these weights give on the run's validation batches is the one the run logged at step 10.
    # Micro-batch 2 on each of 2 ranks; validation draws with the run's seed + 1 (see train/loop.py).
    val = BatchSampler(load_tokens(None, 64).val, 64, global_batch_size=2 * 2, seed=1)
    with torch.no_grad():
        losses = [causal_lm_loss(model(x), y) for x, y in (val.global_batch(0, i) for i in range(4))]
    torch.testing.assert_close(torch.stack(losses).mean().item(), _metrics(out)[-1]["val_loss"], rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_line(checkpointed_run, tmp_path, capsys):
    damaged = tmp_path / "step_10"
    shutil.copytree(checkpointed_run[0] / "step_10", damaged)
    os.truncate(damaged / "__0_0.distcp", 7)
    existing = _file(tmp_path / "existing.safetensors", b"keep me")
    cases = {
        str(damaged): (str(tmp_path / "new.safetensors"), r"step_10 is damaged: __0_0.distcp is truncated \(7 of \d+ bytes\)"),
        str(checkpointed_run[0] / "step_10"): (existing, "existing.safetensors already exists and is never overwritten"),
        str(checkpointed_run[0]): (str(tmp_path / "new.safetensors"),  # once: "incomplete ... delete this folder"
                                   r"is a run folder, not a checkpoint: pass one of its checkpoints, e.g. the newest, "
                                   r".*step_10$"),
    }
    for source, (target, message) in cases.items():
        assert main(["export", source, "--to", target]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("torchmics export: error: ") and re.search(message, err), err
    assert Path(existing).read_bytes() == b"keep me" and not (tmp_path / "new.safetensors").exists()


# ---- bad input fails before any worker exists ---------------------------------------------------


def _file(path: Path, content: str | bytes) -> str:
    """Write ``content`` to ``path`` and return the path, for a flag's value."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


OUT_OF_VOCAB = np.array([1, 2, 300] * 200, dtype=np.uint16).tobytes()  # token 300 needs a vocabulary of 301

BAD_INPUTS = {  # case: (flags given a temporary folder, what the error must say)
    "missing data": (lambda d: ["--data", str(d / "nope.txt")], "data path .*nope.txt does not exist"),
    "partition 3 of 4": (
        lambda d: ["--nproc", "4", "--emulate-nodes", "2", "--partition-size", "3"],
        r"partition_size=3 is not valid for 4 ranks with 2 per node.*Valid sizes: \[1, 2, 4\]",
    ),
    "too few tokens": (
        lambda d: ["--data", _file(d / "small.txt", b"hello world")],
        "11 tokens.*need at least 65 for one sequence of 64",
    ),
    "unknown preset": (lambda d: ["--model", "gpt5"], "unknown model preset 'gpt5'; valid presets: tiny, small"),
    "unknown TOML key": (
        lambda d: ["--config", _file(d / "r.toml", "stepz = 3\n")],
        "unknown keys in .*r.toml: stepz; valid keys: ",
    ),
    "wrong TOML type": (
        lambda d: ["--config", _file(d / "r.toml", 'steps = "10"\n')],
        "steps = '10' must be an integer",
    ),
    "data vocab beyond the model's": (
        lambda d: ["--data", _file(d / "tokens.bin", OUT_OF_VOCAB)],
        "the data needs a vocabulary of 301 tokens but model tiny has 256",
    ),
    "nodes not dividing ranks": (lambda d: ["--nproc", "4", "--emulate-nodes", "3"], "cannot split 4 processes into 3"),
    "eval every 0": (lambda d: ["--eval-every", "0"], "--eval-every must be >= 1"),
    "error feedback off, nothing quantized": (lambda d: ["--no-error-feedback"],
                                              "--no-error-feedback applies to a quantized replica hop only"),
    "resume from no checkpoint": (lambda d: ["--resume", str(d)], "is not a complete checkpoint"),
    "resume from nothing": (lambda d: ["--resume", str(d / "gone")], r"--resume: no checkpoint at .*gone: expected"),
    "lr NaN": (lambda d: ["--lr", "nan"], "--lr must be a finite number, got nan"),
    "lr infinite": (lambda d: ["--lr", "inf"], "--lr must be a finite number, got inf"),
    "min-lr NaN": (lambda d: ["--min-lr", "nan"], "--min-lr must be a finite number, got nan"),
    "weight decay NaN": (lambda d: ["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    "grad clip NaN": (lambda d: ["--grad-clip", "nan"], r"--grad-clip must be > 0 \(inf turns clipping off\), got nan"),
    "wandb project without wandb": (lambda d: ["--wandb-project", "p"], "--wandb-project only applies with --wandb"),
    "keep checkpoints without any": (lambda d: ["--keep-checkpoints", "2"],
                                     "--keep-checkpoints only applies to a run that saves checkpoints"),
    "NaN from TOML": (lambda d: ["--config", _file(d / "r.toml", "lr = nan\n")], "--lr must be a finite number"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_before_spawning(case, tmp_path, capsys, no_spawn):
    flags, message = BAD_INPUTS[case]
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), *flags(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchmics train: error: ") and re.search(message, err), err


def test_a_fresh_run_refuses_an_out_dir_holding_checkpoints(checkpointed_run, capsys, no_spawn):
    assert main(["train", *TINY, "--out", str(checkpointed_run[0])]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of a run" in err and "pass --resume auto to continue it" in err, err


@pytest.mark.parametrize(("nproc", "emulate_nodes", "launch"), [
    (None, None, (4, 2)),  # the CPU default: 2 nodes x 2, so the hierarchy runs
    (3, None, (3, 1)),  # odd: one node, where it was "cannot split 3 processes into 2 emulated nodes"
    (6, None, (6, 2)),
    (6, 3, (6, 3)),
])
def test_the_cpu_default_splits_the_processes_into_two_nodes_only_when_they_divide(nproc, emulate_nodes, launch,
                                                                                     monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = TrainConfig(model="tiny", seq_len=64, out=str(tmp_path), nproc=nproc, emulate_nodes=emulate_nodes)
    started = command.preflight(cfg)
    assert (started.nprocs, started.nodes) == launch


# ---- torchrun and the examples ------------------------------------------------------------------


def test_under_torchrun_nothing_is_spawned_and_nodes_come_from_local_world_size(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "12")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = TrainConfig(model="tiny", seq_len=64, out=str(tmp_path), partition_size="12")
    assert command.preflight(cfg) is None  # no launch: the ranks exist already
    cfg.partition_size = "6"  # would be fine on one node of 12; 3 nodes of 4 cannot hold groups of 6
    with pytest.raises(ValueError, match=r"12 ranks with 4 per node.*Valid sizes: \[1, 2, 4, 12\]"):
        command.preflight(cfg)


def test_example_config_is_valid():
    args = build_parser(argparse.ArgumentParser()).parse_args(["--config", str(REPO / "examples/run.toml")])
    cfg = resolve_config(args)
    assert (cfg.model, cfg.mixed_precision, cfg.checkpoint_every) == ("1.4b", "bf16", 500)
    subprocess.run(["bash", "-n", str(REPO / "examples/slurm.sbatch")], check=True)  # the script parses
