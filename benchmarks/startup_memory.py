"""Peak host memory of `torchmics train` from launch until training begins, summed over every process.

Starts the command, samples the resident memory (VmRSS) of it and all its descendants every 0.1 s
from /proc, and stops the job once the run's config.json appears (it is written after the model is
built, sharded and initialized and the optimizer exists: the moment training begins). Linux only.

    python benchmarks/startup_memory.py -- torchmics train --model 760m --nproc 8 --micro-batch 1 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from each process's parent in /proc/<pid>/stat."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], out: Path, timeout_s: float) -> dict:
    began = time.monotonic()
    job = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    peak, peak_processes = 0, 0
    while not (out / "config.json").exists():
        if job.poll() is not None:
            raise RuntimeError(f"the job exited ({job.returncode}) before training began: {job.stderr.read().decode()[-2000:]}")
        if time.monotonic() - began > timeout_s:
            os.killpg(job.pid, signal.SIGKILL)
            raise TimeoutError(f"training did not begin within {timeout_s:.0f} s")
        tree = descendants(job.pid)
        total = sum(resident_bytes(pid) for pid in tree)
        if total > peak:
            peak, peak_processes = total, len(tree)
        time.sleep(0.1)
    seconds = time.monotonic() - began
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    return {"command": " ".join(command), "peak_rss_gib": round(peak / 2**30, 2), "processes_at_peak": peak_processes,
            "seconds_to_training": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the train command, after --")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    if not command:
        parser.error("give the command to measure after --")
    if command[0] == "torchmics":
        command = [sys.executable, "-m", "torchmics.cli", *command[1:]]
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(command, Path(folder) / "run", args.timeout)))


if __name__ == "__main__":
    main()
