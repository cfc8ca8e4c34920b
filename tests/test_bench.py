"""`torchmics bench` on CPU: every system runs through the same harness and lands in the results."""

import argparse
import json

import pytest

from torchmics.bench import command as bench_command
from torchmics.bench.command import _systems
from torchmics.cli import main

REQUIRED = {"system", "partition_size", "nodes", "gpus_per_node", "emulated", "accum", "reduce_dtype",
            "tokens_per_s_per_gpu", "mfu", "peak_mem_gib", "device"}


def _exit_status(argv: list[str]) -> int:
    """main's status, or argparse's when it rejects a flag itself (it exits)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_bench_runs_each_system_and_writes_table_and_chart(tmp_path):
    systems = "torchmics,fsdp2-full,ddp"  # the others share these code paths (and the equivalence tests)
    args = ["bench", "--out", str(tmp_path), "--systems", systems, "--emulate-nodes", "2",
            "--partition-size", "2", "--steps", "1", "--warmup", "1", "--seq-len", "32"]
    assert main(args) == 0
    records = _records(tmp_path)
    assert [r["system"] for r in records] == systems.split(",")
    for record in records:
        assert record["status"] == "ok", record.get("error")
        assert REQUIRED <= set(record)
        assert record["tokens_per_s_per_gpu"] > 0 and record["nodes"] == 2 and record["gpus_per_node"] == 2
    partitions = {r["system"]: r["partition_size"] for r in records}
    assert partitions == {"torchmics": 2, "fsdp2-full": 4, "ddp": 1}
    table = (tmp_path / "results.md").read_text()
    assert table.count("| 2 emulated nodes x 2") == len(systems.split(","))
    assert (tmp_path / "results.png").stat().st_size > 0


def test_earlier_system_name_is_still_accepted():
    args = argparse.Namespace(systems="torchmics,torchmics-replica-optimizer", nproc=2, grad_clip=None)
    assert _systems(args) == ["torchmics", "torchmics-optimizer-over-replicas"]


def test_profile_writes_kernel_table_and_trace(tmp_path):
    """--profile runs one extra step under torch.profiler: its table names the step's real ops."""
    args = ["bench", "--out", str(tmp_path), "--systems", "torchmics-optimizer-over-replicas", "--emulate-nodes", "2",
            "--partition-size", "1", "--steps", "1", "--warmup", "1", "--seq-len", "32", "--profile"]
    assert main(args) == 0
    [record] = _records(tmp_path)
    assert record["status"] == "ok", record.get("error")
    assert record["profile"]["profiled_step_s"] > 0
    table = (tmp_path / "profiles" / "torchmics-optimizer-over-replicas-p1-accum2-bf16.txt").read_text()
    assert "aten::mm" in table and "reduce_scatter" in table  # matmuls and the replica hop were seen
    assert (tmp_path / "profiles" / "torchmics-optimizer-over-replicas-p1-accum2-bf16.json.gz").stat().st_size > 0


def test_profile_counts_overlapping_kernels_once():
    from torchmics.bench.profile import _union_us

    assert _union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert _union_us([]) == 0


def test_collectives_compare_flat_and_hierarchical(tmp_path):
    assert main(["bench", "--collectives", "--emulate-nodes", "2", "--out", str(tmp_path)]) == 0
    records = _records(tmp_path)
    assert {(r["op"], r["algo"]) for r in records} == {(op, algo) for op in ("all_gather", "reduce_scatter")
                                                      for algo in ("flat", "hierarchical")}
    assert all(r["busbw_gbps"] > 0 and r["ranks"] == 4 and r["nodes"] == 2 for r in records)


def test_bench_rejects_bad_input_before_running(tmp_path, capsys):
    assert main(["bench", "--systems", "torchmics,zero9", "--out", str(tmp_path)]) == 2
    assert "unknown systems ['zero9']" in capsys.readouterr().err
    assert main(["bench", "--partition-size", "3", "--out", str(tmp_path)]) == 2
    assert "Valid sizes" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "gpt5"], "unknown model preset 'gpt5'"),
    (["--seq-len", "100000"], "seq_len 100000 is outside model tiny's context"),
    (["--micro-batch", "0"], "argument --micro-batch: must be an integer >= 1, got 0"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
])
def test_bench_refuses_what_no_system_can_run_without_recording_it(flags, message, tmp_path, capsys, monkeypatch):
    # These used to run every system, record each as failed (or --micro-batch 0 as ok at 0 tok/s) and exit 0.
    monkeypatch.setattr(bench_command, "run_system", lambda *a, **k: pytest.fail("ran a system for refused input"))
    assert _exit_status(["bench", "--nproc", "2", "--systems", "torchmics", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()
