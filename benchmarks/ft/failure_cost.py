"""What one SIGKILLed rank costs: fault-tolerant replica groups (torchft) vs a torchrun restart, on CPU.

Same job both ways: the tiny GPT, 2 partition groups of 2 gloo ranks. Fault tolerant: two
`torchmics train --fault-tolerant` groups and a lighthouse; a rank of group 1 is killed after step
KILL_AT, group 1 is restarted at once. Plain: one 4-rank job under `torchrun --max-restarts 1` with a
checkpoint every CHECKPOINT_EVERY steps, a rank killed after step KILL_AT. Prints, for the ranks
that did not fail, the committed steps they lost (trained again), the step in flight at the failure that
fault tolerance redoes, and the seconds they stood still (fault tolerant: the
step times above 3x the median, less the median; torchrun: from the kill to the first step after it).

    python benchmarks/ft/failure_cost.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torchft._torchft import LighthouseServer

STEPS, KILL_AT, CHECKPOINT_EVERY = 400, 30, 20  # the survivor must outlast the restart
JOB = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--accum", "2", "--log-every", "1",
       "--eval-every", str(STEPS), "--steps", str(STEPS)]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TORCHFT_TIMEOUT_SEC": "10", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def records(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def children(pid: int, marker: bytes) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def kill_after(job: subprocess.Popen, out: Path, step: int, marker: bytes) -> float:
    """SIGKILL one rank of ``job`` once ``out`` logged ``step``; the time of the kill."""
    while len(records(out)) < step:
        time.sleep(0.01)
    os.kill(children(job.pid, marker)[-1], signal.SIGKILL)
    return time.time()


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def stall(out: Path) -> tuple[float, float]:
    """(seconds the surviving ranks stood still, their median step time), from the records' step times."""
    steps = [r["step_time_s"] for r in records(out)][1:]
    typical = statistics.median(steps)
    return sum(max(0.0, t - typical) for t in steps if t > 3 * typical), typical


def fault_tolerant(root: Path) -> dict:
    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=5000, heartbeat_timeout_ms=2000)
    try:
        group = lambda g, extra=(): start(  # noqa: E731
            [sys.executable, "-m", "torchmics.cli", "train", *JOB, "--nproc", "2", "--fault-tolerant",
             "--replica-groups", "2", "--replica-group", str(g), "--lighthouse", server.address(),
             "--out", str(root / f"group{g}"), *extra], root / f"group{g}.log")
        survivor, victim = group(0), group(1, ("--emulate-nodes", "2"))
        kill_after(victim, root / "group1", KILL_AT, b"spawn_main")
        victim.wait()
        rejoined = group(1, ("--emulate-nodes", "2"))
        assert survivor.wait(timeout=600) == 0 and rejoined.wait(timeout=600) == 0
    finally:
        server.shutdown()
    steps = [r["step"] for r in records(root / "group0")]
    redone = (root / "group0.log").read_text().count("did not commit")
    logged = [r["step"] for r in records(root / "group1")]
    back = next(b for a, b in zip(logged, logged[1:]) if b != a + 1)  # the first step after the rejoin
    stood, typical = stall(root / "group0")
    return {"system": "fault-tolerant (torchft)", "survivor_steps_lost": len(steps) - len(set(steps)),
            "uncommitted_steps_redone": redone,
            "survivor_steps_logged_once": steps == list(range(steps[0], STEPS + 1)), "survivor_stall_s": stood,
            "failed_group_rejoined_at_step": back - 1, "median_step_s": typical}


def torchrun_restart(root: Path) -> dict:
    out, log = root / "plain", root / "plain.log"
    job = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                 "--max-restarts", "1", "-m", "torchmics.cli", "train", *JOB, "--emulate-nodes", "2",
                 "--partition-size", "2", "--checkpoint-every", str(CHECKPOINT_EVERY), "--resume", "auto",
                 "--out", str(out)], log)
    killed_at = kill_after(job, out, KILL_AT, b"torchmics.cli")
    died_after = records(out)[-1]["step"]
    while not re.search(r"resumed   from.*\n(.*\n)*step +\d+ ", log.read_text()):
        time.sleep(0.01)  # until the restarted job logged its first step
    back_s = time.time() - killed_at
    resumed = int(log.read_text().split("resumed   from")[1].split("at step")[1].split()[0])
    assert job.wait(timeout=600) == 0
    return {"system": "torchrun restart from the last checkpoint", "survivor_steps_lost": died_after - resumed,
            "survivor_stall_s": back_s, "median_step_s": statistics.median(r["step_time_s"] for r in records(out))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu-torchft")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:  # run folders, logs and checkpoints of both runs
        rows = [fault_tolerant(Path(scratch)), torchrun_restart(Path(scratch))]
    (out / "failure_cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
