"""What `torchmics train` measures and when it stops: interval timing, records, summary, plot, NaN stops.

Runs go through ``python -m torchmics.cli`` as a user runs them; the expected values are computed
here from the flags (tokens per step, interval boundaries) and from metrics.jsonl, not taken from
the code under test.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchmics import hardware
from torchmics.models import get_preset, schedules
from torchmics.models.gpt import causal_lm_loss
from torchmics.train.meter import NonFiniteGuard

TINY = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--emulate-nodes", "1"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torchmics.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env, check=False)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """2 ranks, 2 micro-steps, 25 steps in intervals of 10: boundaries at 10, 20 and 25 (the last step)."""
    out = tmp_path_factory.mktemp("metrics") / "run"
    result = _cli("train", *TINY, "--nproc", "2", "--accum", "2", "--steps", "25", "--log-every", "10",
                  "--eval-every", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_records_carry_interval_timing(run):
    records = _records(run[0])
    assert [r["step"] for r in records] == list(range(1, 26))
    intervals = [records[0:10], records[10:20], records[20:25]]
    tokens_per_step = 2 * 2 * 2 * 64  # micro-batch x ranks x accum x seq_len
    for interval in intervals:
        assert len({r["step_time_s"] for r in interval}) == 1  # one clock reading per interval
        for r in interval:
            assert r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_time_s"])
            assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
            assert r["mfu"] is None  # no datasheet peak for a CPU
            assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["peak_mem_bytes"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 25]  # evaluation at each interval's end


def test_summary_is_the_median_after_the_first_interval(run):
    out, stdout = run
    after_warmup = [r["tokens_per_s_per_gpu"] for r in _records(out)[10:]]
    summary = re.search(r"done in \d+ s: .* ([\d,]+) tok/s/GPU \(median of steps 11-25; ([\d,]+) tok/s in all\)", stdout)
    assert summary, stdout
    assert int(summary[1].replace(",", "")) == round(statistics.median(after_warmup))
    assert (out / "loss.png").stat().st_size > 0
    assert "schedule  lr 3.0e-03 (torchmics' value for the byte-level CPU toys)" in stdout
    assert "warmup 2 steps" in stdout  # 10% of 25 steps: GPT-3's 375M tokens are far more here


def test_a_non_finite_loss_stops_the_run_naming_its_step_before_any_checkpoint(tmp_path):
    """lr 1e30 makes the first update blow the weights up: step 2 is the first non-finite one."""
    out = tmp_path / "run"
    result = _cli("train", *TINY, "--nproc", "1", "--accum", "1", "--steps", "30", "--lr", "1e30", "--warmup", "0",
                  "--checkpoint-every", "5", "--out", str(out))
    assert result.returncode == 1
    message = "training diverged at step 2: loss nan, gradient norm nan"
    assert f"stopped: {message}" in result.stdout and message in result.stderr, result.stderr[-3000:]
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5]  # the interval ends before the checkpoint at 5
    assert not list(out.glob("step_*"))  # a diverged model is never saved
    assert (out / "loss.png").stat().st_size > 0


def test_max_skipped_steps_skips_then_stops(tmp_path):
    out = tmp_path / "run"
    result = _cli("train", *TINY, "--nproc", "1", "--accum", "1", "--steps", "30", "--lr", "1e30", "--warmup", "0",
                  "--max-skipped-steps", "3", "--out", str(out))
    assert result.returncode == 1
    assert "training diverged at step 5: gradient norm nan in 4 steps in a row, more than --max-skipped-steps 3" \
        in result.stdout, result.stdout[-3000:]
    records = _records(out)
    assert [r.get("skipped", False) for r in records] == [False, True, True, True, True]


def test_guard_counts_non_finite_steps_in_a_row():
    guard = NonFiniteGuard(max_skipped_steps=2)
    verdicts = [guard.skips(torch.tensor(v)) for v in (1.0, math.nan, math.inf, 2.0, math.nan, math.nan)]
    assert verdicts == [False, True, True, False, True, True] and not guard.exhausted
    assert guard.skips(torch.tensor(math.nan)) and guard.exhausted
    assert not NonFiniteGuard(0).skips(torch.tensor(math.nan))  # without skipping nothing is read per step
    record = {"step": 7, "loss": 2.0, "grad_norm": math.inf, "lr": 1e-3}
    assert NonFiniteGuard(0).problem([record]).startswith("training diverged at step 7: loss 2.0, gradient norm inf")
    assert NonFiniteGuard(0).problem([record | {"grad_norm": 1.0}]) is None


# ---- schedules, peaks and the loss -------------------------------------------------------------------

# Brown et al. 2020, table 2.1, by the preset each row fits.
GPT3_PEAK_LR = {"gpt2-124m": 6.0e-4, "350m": 3.0e-4, "760m": 2.5e-4, "1.4b": 2.0e-4, "2.7b": 1.6e-4, "6.7b": 1.2e-4,
                "13b": 1.0e-4}


@pytest.mark.parametrize("preset", GPT3_PEAK_LR)
def test_presets_take_the_gpt3_learning_rate_of_their_size(preset):
    lr, source = schedules.default_lr(preset)
    assert lr == GPT3_PEAK_LR[preset] and source.startswith("GPT-3 table 2.1")
    assert schedules.fill_lrs(preset, None, None) == (lr, pytest.approx(lr / 10))
    assert schedules.fill_lrs(preset, 1e-3, None) == (1e-3, pytest.approx(1e-4))


def test_warmup_is_gpt3s_375m_tokens_capped_at_a_tenth_of_the_run():
    tokens_per_step = 2**20  # GPT-3 XL's 1M-token batch: 375M tokens are 358 steps
    assert schedules.default_warmup(steps=100_000, tokens_per_step=tokens_per_step) == 358
    assert schedules.default_warmup(steps=1000, tokens_per_step=tokens_per_step) == 100
    sched = schedules.Schedule(lr=2e-4, min_lr=2e-5, warmup=10, steps=101)  # steps 0-100
    assert sched.lr_at(0) == pytest.approx(2e-5) and sched.lr_at(9) == pytest.approx(2e-4)
    assert sched.lr_at(55) == pytest.approx(1.1e-4)  # the cosine's midpoint
    assert sched.lr_at(100) == pytest.approx(2e-5)  # the last step trains at min_lr, as the plan says


def test_peak_flops_by_device_name():
    assert hardware.peak_flops("NVIDIA H200") == 989e12
    assert hardware.peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM part's 989e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("cpu") is None and hardware.mfu(1e4, 1e9, None) is None
    # The README's 2x H200 figure for the 1.4b preset: 53,709 tokens/s per GPU is 49.3% MFU.
    assert hardware.mfu(53_709, get_preset("1.4b").flops_per_token(), 989e12) == pytest.approx(0.493, abs=5e-4)


def test_fused_loss_equals_fp32_cross_entropy():
    """The compiled loss against F.cross_entropy on the same logits upcast to fp32: value and gradient."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 16, 300)).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (2, 16))
    reference = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (expected,) = torch.autograd.grad(reference, logits)
    fused = causal_lm_loss(logits, targets, fused=True)
    (grad,) = torch.autograd.grad(fused, logits)
    assert fused.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)  # the same bf16 gradient, bit for bit


def test_bench_single_system_runs_unsharded_and_refuses_several_ranks(tmp_path):
    result = _cli("bench", "--systems", "single", "--nproc", "1", "--steps", "1", "--warmup", "1",
                  "--seq-len", "32", "--grad-clip", "1.0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["system"], r["status"], r["partition_size"], r["grad_clip"]) for r in records] == [("single", "ok", 1, 1.0)]
    refused = _cli("bench", "--systems", "single", "--nproc", "2", "--out", str(tmp_path))
    assert refused.returncode == 2 and "single runs on one GPU: bench it with --nproc 1" in refused.stderr
