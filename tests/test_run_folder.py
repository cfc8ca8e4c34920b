"""A run folder belongs to one job; damaged or newer checkpoints never strand a resume; errors are one line.

The rows of issue 18's table, tried as a user would: ``python -m torchmics.cli train`` (2 gloo ranks,
the tiny model), with the run folder's files inspected on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from torchmics.cli import main
from torchmics.train import command
from torchmics.train.run_folder import LOCK_FILE, Holder, RunFolderBusy, hold, set_aside_newer

STEPS, EVERY, KEEP = 12, 3, 3
FLAGS = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--accum", "2", "--nproc", "2",
         "--emulate-nodes", "1", "--steps", str(STEPS), "--eval-every", "6", "--log-every", "1"]  # fmt: skip
CHECKPOINTED = [*FLAGS, "--checkpoint-every", str(EVERY), "--keep-checkpoints", str(KEEP)]
TIMEOUT_S = 120


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torchmics.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env, check=False)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in records]


def _stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return result.stderr.strip().splitlines()


# ---- the lock, in this process ----------------------------------------------------------------------


def _lock_as(out: Path, holder: Holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps(asdict(holder)))


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_held_folder_is_refused_naming_its_holder_and_freed_after(tmp_path):
    with hold(str(tmp_path / "run")):
        with pytest.raises(RunFolderBusy, match=rf"in use by another job \(pid {os.getpid()} on {socket.gethostname()}"):
            with hold(str(tmp_path / "run")):
                pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_stale_locks_are_taken_over_with_a_warning(tmp_path):
    me = Holder.this_process()
    gone = {"dead pid": replace(me, pid=_dead_pid()), "reused pid": replace(me, process_start=me.process_start - 1)}
    for case, holder in gone.items():
        _lock_as(tmp_path / case, holder)
        with pytest.warns(UserWarning, match="locked by a job that is no longer running"):
            with hold(str(tmp_path / case)) as continues_own_attempt:
                assert not continues_own_attempt
                assert json.loads((tmp_path / case / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_job_refused_before_spawning_leaves_no_folder_behind(tmp_path, capsys, no_spawn):
    out = tmp_path / "runs" / "typo"
    assert main(["train", *FLAGS, "--data", str(tmp_path / "missing.bin"), "--out", str(out)]) == 2
    assert "missing.bin does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither --out nor the parent it created
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["train", *FLAGS, "--data", str(tmp_path / "missing.bin"), "--out", str(kept)]) == 2
    assert kept.is_dir()  # a folder the user made stays


def test_a_lock_on_another_host_is_refused_with_how_to_reclaim_it(tmp_path):
    _lock_as(tmp_path, replace(Holder.this_process(), host="elsewhere", pid=1))
    with pytest.raises(RunFolderBusy, match=f"pid 1 on elsewhere.*delete {tmp_path / LOCK_FILE}"):
        with hold(str(tmp_path)):
            pass


def test_a_restarted_torchrun_job_takes_over_its_own_lock_quietly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    _lock_as(tmp_path, replace(Holder.this_process(), host="node-7", pid=1))  # the dead attempt's rank 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hold(str(tmp_path)) as continues_own_attempt:
            assert continues_own_attempt


def test_set_aside_moves_later_checkpoints_and_copies_the_metrics(tmp_path):
    for step in (3, 6, 9):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "__0_0.distcp").write_text(str(step))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.warns(UserWarning, match=r"moved the later checkpoints step_6, step_9"):
        aside = set_aside_newer(str(tmp_path), 3)
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_6", "step_9"]
    assert (aside / "step_9" / "__0_0.distcp").read_text() == "9"
    assert (aside / "metrics.jsonl").read_text() == (tmp_path / "metrics.jsonl").read_text()
    assert set_aside_newer(str(tmp_path), 3) is None


# ---- real runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted checkpointed run; a second job on its --out is tried while it runs."""
    out = tmp_path_factory.mktemp("reference") / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "torchmics.cli", "train", *CHECKPOINTED, "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    began = time.monotonic()
    second = _cli("train", *CHECKPOINTED, "--out", str(out))
    second_s = time.monotonic() - began
    stdout, stderr = first.communicate(timeout=TIMEOUT_S)
    assert first.returncode == 0, stderr[-4000:]
    return out, {"pid": first.pid, "second": second, "second_s": second_s, "first_stdout": stdout}


def test_a_second_job_on_the_same_out_is_refused_at_once(reference):
    out, runs = reference
    second = runs["second"]
    assert second.returncode == 2 and runs["second_s"] < 30
    (line,) = _stderr_lines(second)
    holder = f"pid {runs['pid']} on {socket.gethostname()}, since "
    assert line.startswith(f"torchmics train: error: --out {out} is in use by another job ({holder}"), line
    assert "Wait for it to finish or choose another --out" in second.stderr
    assert [r["step"] for r in _metrics(out)] == list(range(1, STEPS + 1))  # the first job's, intact
    assert not (out / LOCK_FILE).exists()


def test_retention_keeps_exactly_the_newest(reference):
    out, _ = reference
    assert sorted(p.name for p in out.glob("step_*")) == ["step_12", "step_6", "step_9"]


def test_a_fresh_run_never_replaces_another_runs_metrics(reference, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "spawn", lambda *a, **k: pytest.fail("spawned for input preflight rejects"))
    out, _ = reference
    assert main(["train", *FLAGS, "--out", str(out)]) == 2  # the same --out again, with checkpoints
    assert "already holds checkpoints of a run" in capsys.readouterr().err
    metrics_only = tmp_path / "run"  # a run without checkpoints, then another into its folder
    metrics_only.mkdir()
    shutil.copy(out / "metrics.jsonl", metrics_only)
    before = (metrics_only / "metrics.jsonl").read_bytes()
    for resume in ([], ["--resume", "auto"]):
        assert main(["train", *FLAGS, *resume, "--out", str(metrics_only)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"holds another run's results (metrics.jsonl, steps 1-{STEPS})" in err
        assert "saved no checkpoint to continue from: choose another --out" in err
    assert (metrics_only / "metrics.jsonl").read_bytes() == before


def test_resume_auto_skips_damaged_checkpoints_and_matches_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / "step_13.tmp-1a2b3c4d").mkdir()  # an interrupted save
    os.truncate(out / "step_12" / "__0_0.distcp", 1000)
    (out / "step_9" / "__1_0.distcp").unlink()
    result = _ok(_cli("train", *CHECKPOINTED, "--resume", "auto", "--out", str(out)))
    assert f"resumed   from {out / 'step_6'} at step 6" in result.stdout
    lines = _stderr_lines(result)
    assert lines[0] == f"torchmics train: warning: removed what interrupted saves left in {out}: step_13.tmp-1a2b3c4d"
    assert lines[1].startswith(f"torchmics train: warning: --resume auto: skipping damaged checkpoint {out / 'step_12'}")
    assert "__0_0.distcp is truncated (1000 of " in lines[1]
    assert lines[2] == (f"torchmics train: warning: --resume auto: skipping damaged checkpoint {out / 'step_9'} "
                        "(__1_0.distcp is missing)")
    assert "moved the later checkpoints step_9, step_12" in lines[3] and len(lines) == 4
    assert _losses(_metrics(out)) == _losses(_metrics(reference[0]))  # bit for bit
    (aside,) = out.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_12", "step_9"]


def test_resume_from_an_older_step_runs_past_the_newer_checkpoints(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    result = _ok(_cli("train", *CHECKPOINTED, "--resume", str(out / "step_6"), "--out", str(out)))
    assert "moved the later checkpoints step_9, step_12 and a copy of metrics.jsonl" in result.stderr
    assert f"weights   from the checkpoint {out / 'step_6'}\n" in result.stdout  # not "random init"
    assert _losses(_metrics(out)) == _losses(_metrics(reference[0]))
    assert sorted(p.name for p in out.glob("step_*")) == ["step_12", "step_6", "step_9"]
    (aside,) = out.glob("superseded-*")
    assert _metrics(aside) == _metrics(reference[0])  # the abandoned branch's records, kept


def test_a_checksum_failure_only_workers_see_is_one_line(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    shard = out / "step_12" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size: preflight cannot tell
    shard.write_bytes(bytes(data))
    result = _cli("train", *CHECKPOINTED, "--resume", str(out / "step_12"), "--out", str(out))
    assert result.returncode == 1
    lines = _stderr_lines(result)
    assert len(lines) == 1, result.stderr  # native chatter of the dying ranks goes to native-rank<r>.log
    (line,) = lines
    every_rank_reads_a_share = r"rank (\d) failed: DamagedCheckpointError: "  # the first to report is named
    match = re.match(f"torchmics train: error: {every_rank_reads_a_share}checkpoint {re.escape(str(out / 'step_12'))} "
                     r"is damaged: __1_0.distcp is corrupt \(CRC-32 [0-9a-f]{8}, [0-9a-f]{8} when saved\) "
                     rf"\(full traceback in {re.escape(str(out))}/error-rank(\d).log\)$", line)
    assert match and match[1] == match[2], line
    assert "Traceback (most recent call last)" in (out / f"error-rank{match[1]}.log").read_text()


# ---- bad input: one line, exit 2, before any worker ------------------------------------------------


def test_bad_resume_and_out_fail_before_spawning_in_one_line(reference, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "spawn", lambda *a, **k: pytest.fail("spawned for input preflight rejects"))
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    os.truncate(out / "step_9" / "rng" / "rank1.pt", 3)
    all_damaged = tmp_path / "all-damaged"
    shutil.copytree(reference[0], all_damaged)
    for step in (6, 9, 12):
        (all_damaged / f"step_{step}" / "__0_0.distcp").unlink()
    cases = {
        "every checkpoint damaged": (["--resume", "auto", "--out", str(all_damaged)],
                                     r"every checkpoint in --out .* is damaged \(step_12: __0_0.distcp is missing; "
                                     r"step_9: __0_0.distcp is missing; step_6: __0_0.distcp is missing\)"),
        "another model": (["--model", "small", "--resume", "auto"],
                          f"the checkpoint to resume from, {out / 'step_12'}, does not fit --model small .*pass --model tiny"),
        "truncated": (["--resume", str(out / "step_9")], r"step_9 is damaged: rng/rank1.pt is truncated \(3 of"),
        "the run folder": (["--resume", str(out)], r"--resume: .*run is a run folder, not a checkpoint: pass one of "
                                                   r"its checkpoints, e.g. the newest, .*step_12 \(or --resume auto"),
        "read-only out": (["--out", "/sys/torchmics-run"], "--out /sys/torchmics-run cannot be written"),
        "keep 0": (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
    }
    for case, (flags, message) in cases.items():
        assert main(["train", *FLAGS, "--out", str(out), *flags]) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("torchmics train: error: "), (case, err)
        assert re.search(message, err), (case, err)


def test_every_train_flag_says_what_it_does_its_default_and_allowed_values():
    import argparse

    from torchmics.models import PRESETS
    from torchmics.train.config import build_parser

    actions = [a for a in build_parser(argparse.ArgumentParser())._actions if a.option_strings != ["-h", "--help"]]
    assert len(actions) >= 30
    for action in actions:
        assert action.help and len(action.help) > 20, action.option_strings
        if action.option_strings[0] not in ("--config", "--debug"):
            assert "default" in action.help, action.option_strings
    helps = {a.option_strings[0]: a.help for a in actions}
    assert all(name in helps["--model"] for name in PRESETS)
    assert "one of: fp32, bf16" in helps["--mixed-precision"]
