"""`torchmics train --resume auto` under `torchrun --max-restarts`: killed workers cost time, not results.

A worker is SIGKILLed mid-run (no Python cleanup, as the OOM killer or a lost node would do); torchrun
restarts every worker, they resume from the newest complete checkpoint, and the run must end exactly
(bit for bit, on CPU) where a run that was never killed ends, with each step logged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from torchmics.launch import restart_hazard

STEPS, EVERY = 15, 5
FLAGS = [
    "--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--accum", "2", "--steps", str(STEPS),
    "--eval-every", "5", "--log-every", "1", "--checkpoint-every", str(EVERY), "--resume", "auto",
]  # fmt: skip
RUN_TIMEOUT_S = 150
_T = TypeVar("_T")


@dataclass(frozen=True)
class Kill:
    """SIGKILL the worker of ``rank`` in torchrun attempt ``attempt`` (0 = first start) once ``when(out)``."""

    rank: int
    attempt: int
    when: Callable[[Path], bool]


def _logged_step(out: Path) -> int:
    """The last step in metrics.jsonl (0 if none yet); a half-written last line counts as not there."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue
    return 0


def _saving(step: int) -> Callable[[Path], bool]:
    """A trigger: true while the checkpoint of ``step`` is being written (its temporary directory exists)."""

    def saving(out: Path) -> bool:
        return out.is_dir() and any(name.startswith(f"step_{step}.tmp-") for name in os.listdir(out))

    return saving


def _workers(agent_pid: int) -> dict[tuple[int, int], int]:
    """``{(attempt, rank): pid}`` of torchrun's live workers: its children, identified by their environment."""
    workers = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != agent_pid:
                continue
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):  # it exited while we looked
            continue
        if b"RANK" in env:
            workers[int(env.get(b"TORCHELASTIC_RESTART_COUNT", b"0")), int(env[b"RANK"])] = int(entry)
    return workers


def _killer(agent: subprocess.Popen, out: Path, kills: list[Kill], done: list[str]) -> None:
    """Carry out ``kills`` in order, until one cannot happen because the job ended first."""
    for kill in kills:
        if not _carry_out(agent, out, kill, done):
            return


def _carry_out(agent: subprocess.Popen, out: Path, kill: Kill, done: list[str]) -> bool:
    """The victim is found before its trigger fires, so the kill lands at once."""
    pid = _wait_for(agent, lambda: _workers(agent.pid).get((kill.attempt, kill.rank)), interval_s=0.05)
    if pid is None or not _wait_for(agent, lambda: kill.when(out), interval_s=0.002):
        return False
    os.kill(pid, signal.SIGKILL)
    done.append(f"attempt {kill.attempt} rank {kill.rank} at step {_logged_step(out)}: {sorted(os.listdir(out))}")
    return True


def _wait_for(agent: subprocess.Popen, condition: Callable[[], _T], interval_s: float) -> _T | None:
    """The first true value of ``condition()`` while torchrun runs; None if it ends before."""
    while agent.poll() is None:
        if value := condition():
            return value
        time.sleep(interval_s)
    return None


def _torchrun(out: Path, kills: Sequence[Kill] = ()) -> tuple[str, list[str]]:
    """Run the job under torchrun (2 workers, up to 2 restarts); returns its output and the kills made.

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, as examples/slurm.sbatch sets it: otherwise the workers
    of every attempt share one store with torchrun and a restart can read the dead attempt's gloo
    addresses (pytorch/pytorch#135712): without it, this test failed in its second restart.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "2", "-m", "torchmics.cli", "train", *FLAGS, "--out", str(out)]  # fmt: skip
    log = out.with_suffix(".log")
    done: list[str] = []
    with log.open("w") as sink:
        env = os.environ | {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        agent = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        killer = threading.Thread(target=_killer, args=(agent, out, list(kills), done), daemon=True)
        killer.start()
        try:
            code = agent.wait(timeout=RUN_TIMEOUT_S)
        finally:
            _stop(agent)
        killer.join()
    output = log.read_text()
    assert code == 0, f"torchrun exited with {code}; kills: {done}\n{output[-6000:]}"
    return output, done


def _stop(agent: subprocess.Popen) -> None:
    """Kill the torchrun agent and its workers if they are still running (a timeout): nothing outlives the test."""
    if agent.poll() is None:
        for pid in _workers(agent.pid).values():
            os.kill(pid, signal.SIGKILL)
        agent.kill()
        agent.wait()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The metrics of the same job, never killed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    output, _ = _torchrun(out)
    assert "resumed" not in output
    return _metrics(out)


def test_killed_workers_resume_and_match_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    kills = [
        Kill(rank=1, attempt=0, when=lambda out: _logged_step(out) >= 7),  # after step_5, well before step_10
        Kill(rank=0, attempt=1, when=_saving(10)),  # rank 0 publishes checkpoints: kill it mid-save
    ]
    output, done = _torchrun(out, kills)
    assert len(done) == 2, f"only {len(done)} of the 2 kills happened: {done}\n{output[-4000:]}"
    resumed = [line.split()[2] for line in output.splitlines() if line.startswith("resumed   from")]
    # The first restart resumes from step_5. The second from step_5 again when the kill beat the
    # publishing rename (the usual case), from step_10 when the save had just completed.
    assert len(resumed) == 2 and resumed[0] == str(out / "step_5"), (resumed, done)
    assert resumed[1] in (str(out / "step_5"), str(out / "step_10")), (resumed, done)

    metrics = _metrics(out)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1)), "each step logged exactly once"
    for got, want in zip(metrics, reference):
        assert (got["loss"], got.get("val_loss")) == (want["loss"], want.get("val_loss")), f"step {got['step']}"
    assert (out / "latest").read_text() == f"step_{STEPS}"


def test_warns_when_torchrun_shares_its_store_across_restarts(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_hazard()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes torchrun export
    assert restart_hazard() is None
