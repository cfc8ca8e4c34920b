"""Spawned workers: native libraries' stderr goes to per-rank files, Python's to the terminal; each
rank sees the launcher's environment, output and a generator of its own; Ctrl-C leaves no rank behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dist_utils import run_ranks


def test_native_stderr_goes_to_the_rank_log_and_python_warnings_to_the_terminal(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import ctypes, os, warnings
        from pathlib import Path
        from torchmics.launch import LocalLaunch, spawn

        def work():
            rank = os.environ["RANK"]
            ctypes.CDLL(None).dprintf(2, b"native chatter from rank %s\\n", rank.encode())  # as c10d writes
            warnings.warn(f"a warning for users from rank {{rank}}")

        def log(rank):
            return Path({str(tmp_path)!r}) / f"native-{{rank}}.log"

        if __name__ == "__main__":
            spawn(work, LocalLaunch(2), native_logs=log)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "native chatter" not in result.stderr
    assert "a warning for users from rank 0" in result.stderr and "a warning for users from rank 1" in result.stderr
    for rank in (0, 1):
        assert (tmp_path / f"native-{rank}.log").read_text() == f"native chatter from rank {rank}\n"


def _environment_value() -> tuple[str | None, str]:
    return os.environ.get("TORCHMICS_TEST_VALUE"), os.environ["RANK"]


def test_ranks_see_the_environment_of_their_launch_not_of_an_earlier_one(monkeypatch):
    """CPU ranks fork from a server started at the first launch; a later launch's variables must reach them."""
    monkeypatch.setenv("TORCHMICS_TEST_VALUE", "first")
    assert run_ranks(_environment_value, 2) == [("first", "0"), ("first", "1")]
    monkeypatch.setenv("TORCHMICS_TEST_VALUE", "second")
    assert run_ranks(_environment_value, 2) == [("second", "0"), ("second", "1")]
    monkeypatch.delenv("TORCHMICS_TEST_VALUE")
    assert run_ranks(_environment_value, 2) == [(None, "0"), (None, "1")]


def _torch_random() -> tuple[int, float]:
    import torch

    return torch.initial_seed(), torch.rand(()).item()


def test_every_rank_and_every_launch_has_its_own_unseeded_torch_generator():
    """As spawned processes do: ranks forked from one server must not share its generator state
    (unseeded dropout masks or noise would be the same on every rank, and in every launch)."""
    first, second = run_ranks(_torch_random, 2), run_ranks(_torch_random, 2)
    assert len({*first, *second}) == 4, (first, second)


def test_ranks_write_to_the_launchers_stdout_and_stderr_of_their_launch(tmp_path):
    """A fork server keeps the descriptors the launcher had when it started; ranks must get the current ones."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from torchmics.launch import LocalLaunch, spawn

        def work(tag):
            print(f"out {{tag}} {{os.environ['RANK']}}", flush=True)
            print(f"err {{tag}} {{os.environ['RANK']}}", file=sys.stderr, flush=True)

        if __name__ == "__main__":
            for tag in ("first", "second"):
                with open(os.path.join({str(tmp_path)!r}, tag + ".log"), "w") as log:
                    saved = os.dup(1), os.dup(2)
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    spawn(work, LocalLaunch(2), tag)
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for tag in ("first", "second"):
        written = sorted((tmp_path / f"{tag}.log").read_text().splitlines())
        assert written == sorted(f"{kind} {tag} {rank}" for kind in ("out", "err") for rank in (0, 1)), (tag, written)


def test_ctrl_c_in_the_launcher_stops_ranks_that_ignore_it(tmp_path):
    """A rank blocked in a collective does not act on SIGINT; the launcher must not leave it behind."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from torchmics.launch import LocalLaunch, spawn

        def work():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            Path({str(tmp_path)!r}, "rank" + os.environ["RANK"]).write_text(str(os.getpid()))
            time.sleep(600)

        if __name__ == "__main__":
            spawn(work, LocalLaunch(2))
    """))
    launcher = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    pid_files = [tmp_path / f"rank{r}" for r in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(f.read_text()) for f in pid_files]
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) != 0 and "KeyboardInterrupt" in launcher.stderr.read()
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it yet
