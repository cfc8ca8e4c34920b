"""How well the calibrated models predict our own measurements, each run left out of its own calibration.

A profile is calibrated on results files in order (say NVLink runs, then emulated nodes of the same
machine) and then predicts every run of the last file. The run being predicted is removed from the
calibration lines first, so no prediction is fitted to itself; emulated runs are never fitted to at
all (see :func:`torchmics.plan.calibrate`). ``tests/test_plan.py`` holds every prediction to 15%;
``python -m torchmics.plan.validate`` prints the table that ``benchmarks/simulate/README.md`` quotes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchmics.plan.calibrate import calibrate_lines
from torchmics.plan.cluster import PROFILES, ClusterProfile
from torchmics.plan.records import Record, predict_record, training_records
from torchmics.tables import markdown_table, read_jsonl

RESULTS = Path("benchmarks/results")
# (profile, results files to calibrate it on; the runs of the last are predicted)
COMMITTED = (
    ("h100-3200", ("h100-nvlink-1x2",)),
    ("emulated-h100", ("h100-nvlink-1x2", "h100-emulated-2x1")),
    *(
        ("emulated-h200", ("h200-nvlink-1x2-collectives", "h200-nvlink-1x2-compile", "h200-emulated-2x1-collectives", runs))
        for runs in ("h200-emulated-2x1-replica", "h200-emulated-2x1-final")  # the beyond-MiCS options
    ),
)


@dataclass(frozen=True)
class Check:
    """One measured run next to what the models predict for it."""

    setting: str
    record: Record
    tokens_per_s_per_gpu: float
    memory_gib: float

    @property
    def throughput_error(self) -> float:
        return self.tokens_per_s_per_gpu / self.record["tokens_per_s_per_gpu"] - 1

    @property
    def memory_error(self) -> float:
        return self.memory_gib / self.record["peak_mem_gib"] - 1


def leave_one_out(profile: ClusterProfile, files: Sequence[str | Path]) -> list[Check]:
    """Every run of ``files[-1]``, predicted by ``profile`` calibrated on ``files`` without that run."""
    contents = [(str(path), read_jsonl(path)) for path in files]
    checks = []
    for run in training_records(contents[-1][1]):
        calibrated = profile
        for origin, lines in contents:
            calibrated = calibrate_lines(calibrated, [line for line in lines if line is not run], origin)
        cost, memory = predict_record(calibrated, run)
        hop = f" ({run['replica_reduce_dtype']} replica hop)" if run.get("replica_reduce_dtype") else ""
        setting = f"{Path(files[-1]).parent.name}, accum {run['accum']}, {run['reduce_dtype']} reduce{hop}"
        checks.append(Check(setting, run, cost.tokens_per_s_per_gpu, memory.total_gib))
    return checks


def render_checks(checks: list[Check]) -> str:
    """Measured vs predicted, as a markdown table."""
    headers = ["setting", "system", "P", "tok/s/GPU measured", "predicted", "error", "peak GiB", "predicted", "error"]
    rows = [
        [
            c.setting,
            c.record["system"],
            c.record["partition_size"],
            f"{c.record['tokens_per_s_per_gpu']:,.0f}",
            f"{c.tokens_per_s_per_gpu:,.0f}",
            f"{c.throughput_error:+.1%}",
            f"{c.record['peak_mem_gib']:.1f}",
            f"{c.memory_gib:.1f}",
            f"{c.memory_error:+.1%}",
        ]
        for c in checks
    ]
    return markdown_table(headers, rows)


def committed_checks(results: Path = RESULTS) -> list[Check]:
    """:func:`leave_one_out` on every committed results folder, with the profile that describes it."""
    return [
        check
        for profile, folders in COMMITTED
        for check in leave_one_out(PROFILES[profile], [results / folder / "results.jsonl" for folder in folders])
    ]


if __name__ == "__main__":
    print(render_checks(committed_checks()))
