"""The compressed replica hop: within the format's bound per block, error feedback, exact checkpoints.

Bounds are asserted element by element from the scales each rank actually sent, not with a loose
tolerance: rounding to the nearest int8 level is off by at most half a level (``scale / 2``); fp8
e4m3 keeps 3 mantissa bits, so a value is off by at most 2^-4 of itself, or half the subnormal
spacing (``2^-10 * scale``) near zero.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
import pytest
import contextlib
import os
import warnings

import torch
import torch.distributed as dist

import torchmics
from dist_utils import run_ranks
from test_equivalence import _several, assert_matches_reference
from toy import ToyModel, lm_loss, make_batches
from torchmics.quantized import Quantized, QuantizedReplicaHop, aligned_chunk
from torchmics.sharding import shard_state

FP32_SLACK = 1e-6  # fp32 rounding of the scaling itself, relative
BLOCK = 32


def _bound(fmt: Quantized, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The largest error quantizing ``values`` may make, per element, from its blocks' scales."""
    per_element = scales.repeat_interleave(fmt.block_size)
    if fmt.dtype == torch.int8:
        return per_element / 2 * (1 + FP32_SLACK)
    return torch.maximum(values.abs() * 2**-4, per_element * 2**-10) * (1 + FP32_SLACK)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantizing_stays_within_the_format_bound_of_each_block(dtype):
    fmt = Quantized(dtype, block_size=BLOCK)
    torch.manual_seed(0)
    values = torch.randn(BLOCK * 64) * torch.logspace(-6, 3, 64).repeat_interleave(BLOCK)  # ranges per block
    values[:BLOCK] = 0.0  # an all-zero block has scale 0 and comes back exact
    codes, scales = fmt.quantize(values)
    assert codes.dtype == dtype and scales.shape == (64,)
    back = fmt.dequantize(codes, scales)
    assert torch.all((back - values).abs() <= _bound(fmt, values, scales))
    assert torch.equal(back[:BLOCK], values[:BLOCK])
    assert torch.equal(scales, values.view(-1, BLOCK).abs().amax(1) / (127 if dtype == torch.int8 else 448))


def test_bad_formats_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="torch.int8 or torch.float8_e4m3fn"):
        Quantized(torch.bfloat16)
    for block_size in (0, 2.5, "256"):
        with pytest.raises(ValueError, match="at least one element"):
            Quantized(block_size=block_size)


# ---- the collectives, on 4 replica ranks ----------------------------------------------------------

REPLICAS, STEPS = 4, 40


def _contribution(step: int, rank: int, numel: int) -> torch.Tensor:
    """A gradient with a steady part (which errors without feedback pile up on) and noise."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    steady = torch.linspace(-1, 1, numel) * (rank + 1)
    return steady + 1e-3 * torch.randn(numel, generator=generator)


def _collectives(fmt: Quantized, numel: int) -> dict:
    """STEPS hops of one unit: the first step's inputs, scales and reduced chunk, and the running sums."""
    rank, chunk = dist.get_rank(), aligned_chunk(numel, REPLICAS, fmt.block_size)
    hop = QuantizedReplicaHop(fmt, dist.group.WORLD)
    first = torch.zeros(REPLICAS * chunk)
    first[:numel] = _contribution(0, rank, numel)
    _, sent_scales = fmt.quantize(first.clone())
    mine = hop.reduce_scatter(0, first)
    everyone = [torch.zeros_like(sent_scales) for _ in range(REPLICAS)]
    dist.all_gather(everyone, sent_scales)
    applied_sum, exact_sum = hop.all_gather(0, mine), first.clone()
    for step in range(1, STEPS):
        flat = torch.zeros(REPLICAS * chunk)
        flat[:numel] = _contribution(step, rank, numel)
        exact_sum += flat
        applied_sum += hop.all_gather(0, hop.reduce_scatter(0, flat))
    dist.all_reduce(exact_sum)
    return {"first": first, "mine": mine, "scales": everyone, "chunk": chunk,
            "applied_sum": applied_sum, "exact_mean_sum": exact_sum / REPLICAS}


FORMATS = {"int8": Quantized(torch.int8, BLOCK), "int8-noef": Quantized(torch.int8, BLOCK, error_feedback=False),
           "fp8": Quantized(torch.float8_e4m3fn, BLOCK)}


def _every_format(numel: int) -> dict[str, dict]:
    dist.init_process_group("gloo")
    return {name: _collectives(fmt, numel) for name, fmt in FORMATS.items()}


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    """By format, each rank's results (one job for all formats: one process start)."""
    per_rank = run_ranks(_every_format, REPLICAS, 1000)
    return {name: [rank[name] for rank in per_rank] for name in FORMATS}


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_the_quantized_reduce_scatter_is_the_exact_mean_within_the_senders_bounds(runs, name):
    ranks, fmt = runs[name], FORMATS[name]
    chunk = ranks[0]["chunk"]
    assert chunk % BLOCK == 0 and REPLICAS * chunk >= 1000
    for owner, result in enumerate(ranks):
        own = slice(owner * chunk, (owner + 1) * chunk)
        exact = sum(r["first"][own] for r in ranks) / REPLICAS
        bound = sum(_bound(fmt, r["first"], r["scales"][sender])[own] for sender, r in enumerate(ranks)) / REPLICAS
        assert torch.all((result["mine"] - exact).abs() <= bound + 1e-7)
        assert not torch.equal(result["mine"], exact)  # it was quantized


def test_every_replica_applies_the_same_gradient(runs):
    for ranks in runs.values():
        assert all(torch.equal(r["applied_sum"], ranks[0]["applied_sum"]) for r in ranks)


def test_error_feedback_keeps_the_running_sum_on_the_exact_one(runs):
    """With feedback the applied sum trails the exact sum by one step's rounding; without, errors pile up."""
    def drift(name: str) -> float:
        result = runs[name][0]
        return (result["applied_sum"] - result["exact_mean_sum"]).abs().max().item()

    one_step = max(s.max().item() for s in runs["int8"][0]["scales"])  # a level of the coarsest block
    assert drift("int8") <= one_step
    assert drift("int8-noef") > 5 * drift("int8")


# ---- training: single-process training within the format's noise; replicas stay identical --------

INT8, FP8 = Quantized(torch.int8, block_size=BLOCK), Quantized(torch.float8_e4m3fn, block_size=BLOCK)
TRAIN_STEPS, ACCUM = 3, 2


@pytest.mark.parametrize("world,nodes,partition", [(4, 2, 2), (8, 4, 4)], ids=["2x2-p2", "4x2-p4-hier"])
def test_quantized_hops_train_like_single_process_with_both_optimizers(world, nodes, partition):
    """Two-hop accumulation, clipping, hierarchical partition groups; the all-reduce and the optimizer over replicas."""
    batches = make_batches(TRAIN_STEPS, ACCUM, global_batch=world * 2)
    cases = [(INT8, False), (INT8, True)] if world == 8 else [(FP8, False), (replace(INT8, error_feedback=False), True)]
    jobs = [(world // nodes, partition, "toy", batches, fmt, over_replicas) for fmt, over_replicas in cases]
    per_rank = run_ranks(_several, world, jobs, nodes=nodes)
    for i, (fmt, over_replicas) in enumerate(cases):
        assert_matches_reference(per_rank[0][i], "toy", batches, tolerance=2e-2)
        for rank, result in enumerate(per_rank):  # every replica applies the same gradient: bit-identical shards
            first_replica = per_rank[rank % partition][i]["local_shards"]
            assert all(torch.equal(result[i]["local_shards"][n], t) for n, t in first_replica.items())
        # two-hop: the compressed hop runs once per step, as an all-to-all per unit
        units = per_rank[0][i]["units"]
        assert per_rank[0][i]["traffic"].get(("all_to_all_single", _replica_ranks(0, world, partition)), 0) == \
            units * TRAIN_STEPS


def _replica_ranks(rank: int, world: int, partition: int) -> tuple[int, ...]:
    return tuple(range(rank % partition, world, partition))


# ---- checkpoints: residuals come back bit for bit, and resuming continues exactly ------------------


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches: torch.Tensor) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    for i, micro in enumerate(micro_batches):
        with contextlib.nullcontext() if i == len(micro_batches) - 1 else torchmics.no_replica_sync(model):
            (lm_loss(model, micro.chunk(world)[rank]) / len(micro_batches)).backward()
    torchmics.clip_grad_norm_(model, 1.0)
    opt.step()
    opt.zero_grad()


def _quantized_model(partition: int, over_replicas: bool, wrap: tuple[type, ...] | None = None):
    topo = torchmics.init_mesh(partition_size=partition, gpus_per_node=2)
    torch.manual_seed(0)
    model = torchmics.shard(ToyModel(), topo, mixed_precision=torchmics.MixedPrecision(replica_reduce_dtype=INT8),
                            shard_optimizer_across_replicas=over_replicas, wrap=wrap)
    if over_replicas:
        return model, torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _residuals(model: torch.nn.Module) -> dict:
    state = shard_state(model).quantized_hop.state_dict()
    return {kind: {u: t.clone() for u, t in per_unit.items()} for kind, per_unit in state.items()}


def _shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.to_local().clone() for name, p in model.named_parameters()}


def _round_trip(run_dir: str, over_replicas: bool) -> dict:
    batches = make_batches(3, 2, global_batch=8)
    model, opt = _quantized_model(2, over_replicas)
    for step in range(2):
        _step(model, opt, batches[step])
    path = torchmics.checkpoint_path(run_dir, 2)
    torchmics.save_checkpoint(path, model, opt, step=2)
    saved = _residuals(model)
    _step(model, opt, batches[2])
    model_b, opt_b = _quantized_model(2, over_replicas)
    torchmics.load_checkpoint(path, model_b, opt_b)
    loaded = _residuals(model_b)
    _step(model_b, opt_b, batches[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_c, opt_c = _quantized_model(1, over_replicas)  # 4 replicas of other chunks: residuals start at zero
        torchmics.load_checkpoint(path, model_c, opt_c)
        model_d, opt_d = _quantized_model(2, over_replicas, wrap=())  # same world, one unit
        torchmics.load_checkpoint(path, model_d, opt_d)
    return {"saved": saved, "loaded": loaded, "continued": _shards(model), "resumed": _shards(model_b),
            "elsewhere": [_residuals(model_c), _residuals(model_d)], "warnings": [str(w.message) for w in caught],
            "file": os.path.join(path, "residuals", f"rank{dist.get_rank()}.pt")}


def _both_round_trips(run_dir: str) -> dict[bool, dict]:
    return {over: _round_trip(os.path.join(run_dir, f"over-replicas-{over}"), over) for over in (False, True)}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> tuple[str, dict[bool, list[dict]]]:
    run_dir = str(tmp_path_factory.mktemp("residuals"))
    per_rank = run_ranks(_both_round_trips, 4, run_dir, nodes=2)
    return run_dir, {over: [rank[over] for rank in per_rank] for over in (False, True)}


@pytest.mark.parametrize("over_replicas", [False, True], ids=["all-reduce", "optimizer-over-replicas"])
def test_residuals_round_trip_bit_exact_and_resume_continues_exactly(round_trips, over_replicas):
    run_dir, results = round_trips
    kinds = ("sent",) if over_replicas else ("sent", "owned")
    for rank, result in enumerate(results[over_replicas]):
        on_disk = torch.load(result["file"], weights_only=True)
        for kind in kinds:
            assert result["saved"][kind], f"rank {rank} kept no {kind} residuals"
            for unit, residual in result["saved"][kind].items():
                assert torch.equal(on_disk[kind][unit], residual) and torch.equal(result["loaded"][kind][unit], residual)
        assert all(torch.equal(result["resumed"][n], t) for n, t in result["continued"].items())
        assert result["elsewhere"] == [{"sent": {}, "owned": {}}] * 2
    assert sum("residuals of another topology" in w for w in results[over_replicas][0]["warnings"]) == 2
    metadata = (Path(run_dir) / f"over-replicas-{over_replicas}" / "step_2" / "torchmics.json").read_text()
    assert all(f"residuals/rank{r}.pt" in metadata for r in range(4))  # sized and checksummed like the rest


# ---- a non-finite step (skipped by --max-skipped-steps) must not poison the residuals -------------


def _after_a_non_finite_step(fmt: Quantized) -> dict:
    """One hop where rank 0 sends an inf and a NaN (a step the loop skips), then one finite hop."""
    rank, numel = dist.get_rank(), 3 * BLOCK + 5  # odd: a padded tail
    chunk = aligned_chunk(numel, 2, fmt.block_size)
    hop = QuantizedReplicaHop(fmt, dist.group.WORLD)
    bad = torch.zeros(2 * chunk)
    bad[:numel] = _contribution(0, rank, numel)
    if rank == 0:
        bad[3], bad[BLOCK + 7] = float("inf"), float("nan")
    skipped = hop.all_gather(0, hop.reduce_scatter(0, bad))
    good = torch.zeros(2 * chunk)
    good[:numel] = _contribution(1, rank, numel)
    exact = good.clone()
    dist.all_reduce(exact)
    return {"skipped": skipped, "next": hop.all_gather(0, hop.reduce_scatter(0, good)), "exact": exact / 2,
            "residuals_finite": all(bool(t.isfinite().all()) for kind in hop.state_dict().values() for t in kind.values())}


def _non_finite_every_format() -> dict:
    dist.init_process_group("gloo")
    return {name: _after_a_non_finite_step(fmt) for name, fmt in FORMATS.items() if fmt.error_feedback}


def test_a_non_finite_step_does_not_poison_the_residuals_of_the_steps_after_it():
    """The loop skips a step with a non-finite gradient norm and trains on; the residuals must let it.

    Before the fix, a block holding an inf or NaN left NaN residuals (inf / inf, 0 * inf), which every
    later step added to its gradient: one bad step made every step after it NaN, and the run stopped.
    """
    for name, result in run_ranks(_non_finite_every_format, 2)[0].items():
        assert not result["skipped"].isfinite().all(), name  # the bad step shows (so the loop can skip it)
        assert result["residuals_finite"], f"{name}: non-finite residuals after the skipped step"
        assert result["next"].isfinite().all(), f"{name}: the step after a skipped one is not finite"
        # within two roundings of this step and one owed from before (fp8: 2^-4 of |value| <= 1.5 each)
        assert torch.allclose(result["next"], result["exact"], atol=0.05 if name.startswith("int8") else 0.3), name
