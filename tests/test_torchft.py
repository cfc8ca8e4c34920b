"""`torchmics train --fault-tolerant` on torchft: replica groups that fail alone, on CPU with gloo.

A torchft lighthouse runs in this process; each replica group is its own `torchmics train` job of 2
ranks (group 1 spans 2 emulated nodes). Without failures the groups must train exactly as one plain
torchmics job of 4 ranks in 2 partition groups. With a rank of group 1 SIGKILLed mid-run, group 0
must train on without losing or repeating a step, and group 1, restarted, must rejoin ahead of where
it died (healed from group 0, not from disk: it has no checkpoint) and end bit-identical to group 0.
Every process is started in a session of its own and killed with it, whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchmics
from torchmics import checkpoint, fault_tolerance
from torchmics.cli import main

torchft = pytest.importorskip("torchft", reason="needs torchft: pip install 'torchmics[ft]'")
from torchft._torchft import LighthouseServer  # noqa: E402

SMALL_STEP = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--accum", "2", "--log-every", "1"]
GROUP_FLAGS = ["--nproc", "2", "--fault-tolerant", "--replica-groups", "2"]
LAYOUT = {0: [], 1: ["--emulate-nodes", "2"]}  # group 1's partition group spans 2 (emulated) nodes
ENV = {"OMP_NUM_THREADS": "1", "TORCHFT_TIMEOUT_SEC": "10", "TORCHFT_QUORUM_TIMEOUT_SEC": "60"}
TIMEOUT_S = 240


@contextlib.contextmanager
def lighthouse(min_replicas: int) -> Iterator[str]:
    """A lighthouse on localhost for the ``with`` block; a group is dead after 2 s without heartbeats."""
    server = LighthouseServer(bind="[::]:0", min_replicas=min_replicas, join_timeout_ms=5000, heartbeat_timeout_ms=2000)
    try:
        yield server.address()
    finally:
        server.shutdown()


class Jobs:
    """`torchmics train` processes, each in a session of its own so that it dies with every rank it spawned."""

    def __init__(self, root: Path) -> None:
        self.root, self.running = root, []

    def start(self, name: str, *flags: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("a")
        command = [sys.executable, "-m", "torchmics.cli", "train", *SMALL_STEP, *flags]
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | ENV, start_new_session=True)
        self.running.append(job)
        return job

    def group(self, lighthouse: str, g: int, steps: int, *flags: str) -> subprocess.Popen:
        out = str(self.root / f"group{g}")
        return self.start(f"group{g}", *GROUP_FLAGS, *LAYOUT[g], "--replica-group", str(g), "--lighthouse", lighthouse,
                          "--steps", str(steps), "--eval-every", str(steps), "--out", out, *flags)

    def wait(self, job: subprocess.Popen, name: str) -> int:
        try:
            return job.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish in {TIMEOUT_S} s\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-4000:]

    def stop_all(self) -> None:
        for job in self.running:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.fixture
def jobs(tmp_path) -> Iterator[Jobs]:
    started = Jobs(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl's records; a half-written last line is not there yet."""
    records = []
    with contextlib.suppress(FileNotFoundError):
        for line in (out / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def ranks_of(launcher: subprocess.Popen) -> list[int]:
    """Pids of a `torchmics train` launcher's ranks: the children of its multiprocessing fork server."""
    (server,) = [p for p in _children(launcher.pid) if b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return _children(server)


def final_weights(saved: Path, into: Path) -> dict[str, torch.Tensor]:
    """The full weights of checkpoint ``saved``."""
    torchmics.export_checkpoint(str(saved), str(into))
    return load_file(into)


def test_torchft_groups_without_failures_train_as_one_plain_job(jobs, tmp_path):
    steps = 8
    with lighthouse(min_replicas=2) as address:  # both groups from step 1, as in the plain job
        groups = [jobs.group(address, g, steps) for g in (0, 1)]
        plain = jobs.start("plain", "--nproc", "4", "--emulate-nodes", "2", "--partition-size", "2", "--steps",
                           str(steps), "--eval-every", str(steps), "--out", str(tmp_path / "plain"))
        for g, job in enumerate(groups):
            assert jobs.wait(job, f"group{g}") == 0, jobs.log(f"group{g}")
    assert jobs.wait(plain, "plain") == 0, jobs.log("plain")
    reference, ft = metrics(tmp_path / "plain"), [metrics(tmp_path / f"group{g}") for g in (0, 1)]
    assert [r["step"] for r in reference] == [r["step"] for r in ft[0]] == [r["step"] for r in ft[1]] == list(range(1, steps + 1))
    for want, *got in zip(reference, *ft):
        # Both groups see the same all-reduced gradients, so the norms match the plain job's; the plain
        # job's loss is the mean over its 4 ranks, i.e. over both groups' 2 ranks each.
        assert got[0]["grad_norm"] == got[1]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), want["step"]
        assert (got[0]["loss"] + got[1]["loss"]) / 2 == pytest.approx(want["loss"], abs=1e-5), want["step"]
    assert (ft[0][-1]["val_loss"] + ft[1][-1]["val_loss"]) / 2 == pytest.approx(reference[-1]["val_loss"], abs=1e-5)


def wait_until(condition, what: str, jobs: Jobs, *alive: subprocess.Popen):
    """The first true value of ``condition()``, polled while every job in ``alive`` runs, within the timeout."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and all(job.poll() is None for job in alive):
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen\n{jobs.log('group0')}\n{jobs.log('group1')}")


def test_torchft_survivors_train_on_and_the_killed_group_rejoins_from_a_live_one(jobs, tmp_path):
    # The groups never reach --steps: once both have saved the same step after the rejoin, the test
    # stops them. Group 1's checkpoints are deleted before its restart (--resume auto then finds none),
    # so the state it rejoins with can only come from group 0.
    flags, every, kill_after = ("--checkpoint-every", "10", "--resume", "auto"), 10, 3
    group_dirs = [tmp_path / f"group{g}" for g in (0, 1)]
    logged = lambda g: [r["step"] for r in metrics(group_dirs[g])]  # noqa: E731
    with lighthouse(min_replicas=1) as address:
        survivor = jobs.group(address, 0, 10_000, *flags)
        victim = jobs.group(address, 1, 10_000, *flags)
        # Both train first (one may come up later than the other and be healed by it at the start).
        wait_until(lambda: min(len(logged(0)), len(logged(1))) >= kill_after, "both groups training", jobs, survivor, victim)
        os.kill(ranks_of(victim)[-1], signal.SIGKILL)
        assert jobs.wait(victim, "group1") != 0
        died_after, survivor_at_restart = logged(1)[-1], logged(0)[-1]
        for saved in checkpoint.complete_checkpoints(str(group_dirs[1])):
            shutil.rmtree(saved)
        (group_dirs[1] / checkpoint.LATEST_FILE).unlink(missing_ok=True)
        rejoined = jobs.group(address, 1, 10_000, *flags)
        rejoined_at = wait_until(lambda: next((s - 1 for s in logged(1) if s > died_after), None), "the rejoin", jobs,
                                 survivor, rejoined)
        shared = (rejoined_at // every + 2) * every  # a checkpoint both save, at least one interval after the rejoin
        wait_until(lambda: all((d / f"step_{shared}") in map(Path, checkpoint.complete_checkpoints(str(d)))
                               for d in group_dirs), f"both groups saving step {shared}", jobs, survivor, rejoined)

    survived = logged(0)
    assert survived == list(range(survived[0], survived[-1] + 1)), "the survivor's steps never go back or repeat"
    assert all(math.isfinite(r["loss"]) for r in metrics(group_dirs[0]))
    # It rejoined at the survivor's step, past where it died: healed from group 0, not from disk.
    assert rejoined_at >= max(survivor_at_restart, died_after + 1), (died_after, survivor_at_restart, rejoined_at)
    assert [s for s in logged(1) if s > died_after][: shared - rejoined_at] == list(range(rejoined_at + 1, shared + 1))
    weights = [final_weights(d / f"step_{shared}", tmp_path / f"group{g}.safetensors") for g, d in enumerate(group_dirs)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the groups"


FT = ["train", *SMALL_STEP, "--fault-tolerant"]
BAD_FT_INPUTS = {  # case: (flags, what the one-line error must say)
    "no group index": (FT, "--fault-tolerant needs --replica-group G .* and --replica-groups N"),
    "group out of range": ([*FT, "--replica-group", "2", "--replica-groups", "2"], "--replica-group must be in 0..1"),
    "lighthouse without ft": (["train", *SMALL_STEP, "--lighthouse", "http://x:1"], "--lighthouse only applies with --fault-tolerant"),
    "sharded optimizer": ([*FT, "--replica-group", "0", "--replica-groups", "2", "--optimizer-over-replicas"],
                          "optimizer states cannot be sharded across replicas: each replica group would own the only copy"),
    "quantized replica hop": ([*FT, "--replica-group", "0", "--replica-groups", "2", "--replica-reduce-dtype", "int8"],
                              "a quantized replica hop is not supported: torchft's managed all-reduce sums whole tensors"),
    "partition inside a group": ([*FT, "--replica-group", "0", "--replica-groups", "2", "--nproc", "2",
                                  "--lighthouse", "http://localhost:1", "--partition-size", "1"],
                                 "--partition-size must be its world size 2"),
    "no lighthouse": ([*FT, "--replica-group", "0", "--replica-groups", "2", "--nproc", "2"],
                      "needs torchft's lighthouse: pass --lighthouse http://HOST:29510 or set TORCHFT_LIGHTHOUSE"),
    "unreachable lighthouse": ([*FT, "--replica-group", "0", "--replica-groups", "2", "--nproc", "2", "--lighthouse",
                                "http://127.0.0.1:9"], r"the lighthouse at http://127.0.0.1:9 is unreachable \(.*\): start it"),
}


@pytest.mark.parametrize("case", BAD_FT_INPUTS)
def test_torchft_bad_input_is_one_line_before_spawning(case, tmp_path, capsys, no_spawn, monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    flags, message = BAD_FT_INPUTS[case]
    assert main([*flags, "--out", str(tmp_path / "run")]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("torchmics train: error: ") and err.count("\n") == 1 and re.search(message, err), err


def test_torchft_missing_is_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchft", None)  # what an environment without torchft imports
    with pytest.raises(ImportError, match=r"install it with pip install 'torchmics\[ft\]'"):
        fault_tolerance.require_torchft()


def test_torchft_is_not_needed_to_import_torchmics():
    code = "import sys; sys.modules['torchft'] = None; import torchmics, torchmics.cli; print(torchmics.FaultTolerantReplicas)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ | ENV)
    assert done.returncode == 0 and "FaultTolerantReplicas" in done.stdout, done.stderr


# ---- what a rejoining group is healed with ---------------------------------------------------------


def _normed_model(topo: torchmics.Topology) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose buffers training changes (batch-norm running statistics), not only constants."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    model = torchmics.shard(model, topo, wrap=())
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int, steps: int) -> None:
    generator = torch.Generator().manual_seed(seed)  # every rank the same batches: one replica group
    for _ in range(steps):
        model(torch.randn(16, 8, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _healed_against_live() -> dict:
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    live, live_optimizer = _normed_model(topo)
    _train(live, live_optimizer, seed=1, steps=3)
    behind, behind_optimizer = _normed_model(topo)
    _train(behind, behind_optimizer, seed=2, steps=1)  # a group that died early, on other batches
    sent = io.BytesIO()  # torchft sends the state serialized (HTTP or its process group): never shared memory
    torch.save(fault_tolerance.heal_state(live, live_optimizer), sent)
    sent.seek(0)
    fault_tolerance.apply_heal_state(behind, behind_optimizer, torch.load(sent, weights_only=False))
    healed = torchmics.full_state_dict(behind)
    for model, optimizer in ((live, live_optimizer), (behind, behind_optimizer)):
        _train(model, optimizer, seed=3, steps=2)  # healed, the two must now train alike
    return {"live": torchmics.full_state_dict(live), "healed": healed, "after": torchmics.full_state_dict(behind)}


def test_a_healed_group_takes_the_live_groups_weights_buffers_and_optimizer_state():
    from dist_utils import run_ranks

    result = run_ranks(_healed_against_live, 2)[0]
    assert "1.running_mean" in result["healed"] and "1.num_batches_tracked" in result["healed"]
    assert result["live"].keys() == result["after"].keys()
    for name, tensor in result["live"].items():
        assert torch.equal(result["after"][name], tensor), name  # bit-identical after 2 more steps
