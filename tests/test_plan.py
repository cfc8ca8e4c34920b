"""Planner and simulator: every formula against a hand computation, then the paper's scaling shape."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from torchmics.plan import (
    PAPER_MODELS,
    PROFILES,
    ClusterProfile,
    LinkClass,
    ModelSpec,
    Strategy,
    calibrate,
    estimate_memory,
    evaluate,
    fit_link,
    get_profile,
    pipelined,
    plan,
    predict_record,
    read_jsonl,
    recommend,
    record_strategy,
    render_table,
    replica_all_reduce_time,
    ring_time,
    shard_collective_time,
    simulate,
    step_time,
    training_records,
    with_gpus_per_node,
    write_outputs,
)
from torchmics.plan import auto
from torchmics.plan.planner import explain
from torchmics.plan.auto import gpu_profile, job_cluster, recommend_partition_size
from torchmics.plan.failure import describe as describe_failure
from torchmics.plan.failure import failure_cost
from torchmics.plan.memory import GIB, estimate_host_memory
from torchmics.plan.validate import COMMITTED, committed_checks, leave_one_out, render_checks

LINKS = {"intra": LinkClass(alpha=1e-6, beta=1e11), "inter": LinkClass(alpha=1e-5, beta=1e10)}


def _cluster(gpus_per_node: int = 8, **overrides) -> ClusterProfile:
    fields = dict(
        name="test",
        gpu="test",
        gpus_per_node=gpus_per_node,
        peak_tflops=1000,
        hbm_gib=80,
        hbm_tbps=2.0,
        host_gib=1024,
        compute_mfu=0.5,
        source="test",
        **LINKS,
    )
    return ClusterProfile(**{**fields, **overrides})


# --- model spec ---------------------------------------------------------------------------------


def test_model_spec_from_shape_and_flops():
    spec = ModelSpec.from_shape(n_layer=12, d_model=768, n_head=12, seq_len=1024, vocab_size=50257)
    assert spec.num_params == 12 * 12 * 768**2 + 50257 * 768
    assert spec.flops_per_token == 6 * spec.num_params + 12 * 12 * 768 * 1024
    assert spec.layer_params == 12 * 768**2


def test_model_spec_from_hf_config():
    gpt2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
    assert ModelSpec.from_hf_config(gpt2) == ModelSpec.from_shape(12, 768, 12, 1024, 50257)
    llama2_7b = {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "vocab_size": 32000,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    assert ModelSpec.from_hf_config(llama2_7b).num_params == 6_738_149_376  # the published 6.74B, exactly


def test_model_spec_presets():
    assert 99e9 < ModelSpec.from_preset("mics-100b").num_params < 101e9
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelSpec.from_preset("no-such-model")


def test_model_spec_from_gpt_preset():
    gpt = pytest.importorskip("torchmics.models.gpt")
    spec = ModelSpec.from_preset("1.4b")
    assert spec.num_params == gpt.PRESETS["1.4b"].num_params()
    assert (spec.n_layer, spec.d_model) == (24, 2048)
    assert spec.flops_per_token == gpt.PRESETS["1.4b"].flops_per_token()  # lookup tables do no matmuls
    assert spec.embedding_params == 2 * 50304 * 2048 + 2048 * 2048  # untied: embedding, head, positions


def test_model_spec_from_name(tmp_path):
    gpt2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    assert ModelSpec.from_name(f"hf:{tmp_path}") == ModelSpec.from_hf_config(gpt2)  # a folder holding one
    assert ModelSpec.from_name(f"hf:{tmp_path / 'config.json'}") == ModelSpec.from_hf_config(gpt2)
    assert ModelSpec.from_name("mics-100b") == PAPER_MODELS["mics-100b"]
    with pytest.raises(ValueError, match="does not exist"):
        ModelSpec.from_name(f"hf:{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="decoder-only"):
        ModelSpec.from_hf_config({"vocab_size": 10})


# --- memory -------------------------------------------------------------------------------------

ONE_B = ModelSpec(num_params=1_000_000_000, n_layer=16, d_model=2048, seq_len=1024, vocab_size=32000, n_head=16)
LAYER = (1_000_000_000 - 32000 * 2048) // 16  # 58_404_000


def test_memory_of_1b_model_at_partition_8_by_hand():
    mem = estimate_memory(ONE_B, Strategy.mics(8), world_size=8, gpus_per_node=8, micro_batch=2)
    assert mem.params == 4e9 / 8
    assert mem.grads == 0.0  # freed after every step; backward starts with all activations held
    assert mem.optimizer == 8e9 / 8
    assert mem.gathered == 2 * (32000 * 2048 + 2 * LAYER) + (4 + 2) * LAYER  # bf16 units, fp32 grad + cast
    assert mem.activations == 16 * 1024 * 2 * 2048 * 34
    assert mem.logits == 3 * 2 * 1024 * 32000 * 4  # log-softmax output, its gradient in and out
    assert mem.overhead == GIB
    assert mem.total == pytest.approx(5e8 + 1e9 + 715_112_000 + 2_281_701_376 + 786_432_000 + GIB)


def test_memory_of_accumulated_gradients():
    fp32 = estimate_memory(ONE_B, Strategy.mics(8), 8, 8, micro_batch=2, accum=4)
    assert fp32.grads == 4e9 / 8  # no replicas: FSDP2 accumulates into the fp32 shards
    deferred = estimate_memory(ONE_B, Strategy.mics(8, reduce_bytes=2), 32, 8, micro_batch=2, accum=4)
    assert deferred.grads == 2e9 / 8  # two-hop: the partial reduce-scatter output, in bf16
    synced = estimate_memory(ONE_B, Strategy.mics(8, reduce_bytes=2, two_hop=False), 32, 8, micro_batch=2, accum=4)
    assert synced.grads == 4e9 / 8


def test_memory_options():
    ckpt = estimate_memory(ONE_B, Strategy.mics(8), 32, 8, micro_batch=2, activation_checkpointing=True)
    assert ckpt.activations == 16 * 2 * 1024 * 2 * 2048 + 1024 * 2 * 2048 * 34  # inputs + one block
    sharded = estimate_memory(ONE_B, Strategy.mics(8, optimizer_over_replicas=True), 32, 8, micro_batch=2)
    assert sharded.optimizer == 8e9 / 32
    scores = estimate_memory(ONE_B, Strategy.mics(8), 8, 8, micro_batch=2, flash_attention=False)
    assert scores.activations == 16 * 1024 * 2 * 2048 * (34 + 5 * 16 * 1024 / 2048)


def test_memory_of_ddp_under_autocast():
    ddp = estimate_memory(ONE_B, Strategy.ddp(), 8, 8, micro_batch=2)
    residual = 16 * 2 * 2 * 1024 * 2 * 2048  # two fp32 layer-norm inputs per block: 2 more bytes each
    assert (ddp.params, ddp.optimizer, ddp.gathered) == (4e9, 8e9, 2e9)  # the cast cache's bf16 weights
    assert ddp.activations == 16 * 1024 * 2 * 2048 * 34 + residual
    # the bucket copy, plus the gradients by which the end of backward outgrows its start
    assert ddp.grads == pytest.approx(4e9 + 4e9 - ddp.activations - ddp.logits)
    no_sync = estimate_memory(ONE_B, Strategy.ddp(reduce_bytes=2), 16, 8, micro_batch=2, accum=2)
    assert no_sync.grads == 8e9  # DDP accumulates fp32 .grad between syncs, whatever it communicates in
    assert estimate_memory(ONE_B, Strategy.ddp(param_bytes=4), 8, 8, micro_batch=2).gathered == 0.0


# --- collectives and step time ------------------------------------------------------------------


def test_ring_time_by_hand():
    link = LinkClass(alpha=1e-5, beta=1e10)
    assert ring_time(4, 1e9, link) == pytest.approx(3e-5 + 0.75 * 0.1)
    assert ring_time(4, 1e9, link, passes=2) == pytest.approx(2 * (3e-5 + 0.075))
    assert ring_time(4, 1e9, link, sharers=2) == pytest.approx(3e-5 + 0.15)
    assert ring_time(1, 1e9, link) == 0.0


def test_shard_collectives_by_hand():
    cluster, unit = _cluster(), 3.2e9
    assert shard_collective_time(unit, 8, cluster, hierarchical=True) == pytest.approx(7e-6 + 0.875 * 0.032)
    flat = 31e-5 + 31 / 32 * 0.32
    assert shard_collective_time(unit, 32, cluster, hierarchical=False) == pytest.approx(flat)
    # inter: 4 nodes, each GPU gathers 4 shards of unit/32 on 1/8 of the node's network; then NVLink
    hierarchical = (3e-5 + 0.75 * unit / 8 * 8 / 1e10) + (7e-6 + 0.875 * unit / 1e11)
    assert shard_collective_time(unit, 32, cluster, hierarchical=True) == pytest.approx(hierarchical)
    assert hierarchical < flat


def test_replica_all_reduce_by_hand():
    cluster = _cluster()
    # P=16 on 8 nodes: 4 replicas, 8 groups per node share its network
    assert replica_all_reduce_time(1e9, 64, 16, cluster) == pytest.approx(2 * (3e-5 + 0.75 * 1e9 * 8 / 1e10))
    # P=2: 32 replicas, 2 groups per node
    assert replica_all_reduce_time(1e9, 64, 2, cluster) == pytest.approx(2 * (31e-5 + 31 / 32 * 1e9 * 2 / 1e10))
    assert replica_all_reduce_time(1e9, 8, 2, cluster) == pytest.approx(2 * (3e-6 + 0.75 * 1e9 / 1e11))


# 10 blocks of 1e8 parameters, no embedding; on 2 nodes x 1 GPU with a 1 GB/s, zero-latency network
TOY = ModelSpec(num_params=1_000_000_000, n_layer=10, d_model=1000, seq_len=100, vocab_size=0, n_head=10)
SLOW = _cluster(gpus_per_node=1, inter=LinkClass(alpha=0.0, beta=1e9))


def test_step_time_communication_bound_by_hand():
    cost = step_time(TOY, SLOW, nodes=2, strategy=Strategy.zero3(), micro_batch=1, accum=2)
    ag, rs = 0.5 * 2e8 / 1e9, 0.5 * 4e8 / 1e9  # per block: 0.1 s, 0.2 s
    f = 100 * TOY.flops_per_token / 3 / 5e14 / 10  # forward of one block, far shorter
    optimizer = 28 * 1e9 / 2 / 2e12  # fused AdamW over half the fp32 states at 2 TB/s
    # forward: 10 gathers, the last block's compute sticks out; backward: 10 (gather + scatter), + 1 block
    assert cost.total == pytest.approx(2 * ((10 * ag + f) + (10 * (ag + rs) + 2 * f)) + optimizer)
    assert cost.optimizer == pytest.approx(optimizer)
    assert cost.compute == pytest.approx(2 * 100 * TOY.flops_per_token / 5e14)
    assert cost.tokens_per_s_per_gpu == pytest.approx(200 / cost.total)
    assert cost.mfu == pytest.approx(cost.tokens_per_s_per_gpu * TOY.flops_per_token / 1e15)


def test_pipelined_units():
    assert pipelined(10, comm=0.1, compute=0.02) == pytest.approx(10 * 0.1 + 0.02)  # last compute sticks out
    assert pipelined(10, comm=0.02, compute=0.1) == pytest.approx(10 * 0.1 + 0.02)  # first gather sticks out


def test_step_time_compute_bound_and_checkpointing():
    fast = _cluster(gpus_per_node=1, inter=LinkClass(alpha=0.0, beta=1e15))
    plain = step_time(TOY, fast, 2, Strategy.zero3(), micro_batch=64)
    ckpt = step_time(TOY, fast, 2, Strategy.zero3(), micro_batch=64, activation_checkpointing=True)
    assert plain.total == pytest.approx(plain.compute + plain.optimizer, rel=1e-3)
    assert ckpt.total == pytest.approx(plain.compute * 4 / 3 + plain.optimizer, rel=1e-3)  # one more forward
    assert plain.mfu == pytest.approx(0.5 * plain.compute / plain.total, rel=1e-3)


def test_root_unit_is_gathered_once_and_reduced_last():
    # TOY plus a 1e8-parameter tied embedding: one more gather before forward, one more scatter after backward
    rooted = dataclasses.replace(TOY, num_params=1_100_000_000, vocab_size=100_000)
    plain, with_root = (step_time(m, SLOW, 2, Strategy.zero3(), micro_batch=1) for m in (TOY, rooted))
    root_gather, root_scatter = 0.5 * 2e8 / 1e9, 0.5 * 4e8 / 1e9
    assert rooted.layer_params == TOY.layer_params
    extra = with_root.total - with_root.optimizer - (plain.total - plain.optimizer)
    assert extra == pytest.approx(root_gather + root_scatter, abs=1e-4)  # + the head's little exposed compute
    assert with_root.all_gather == pytest.approx(plain.all_gather + root_gather)


def test_two_hop_amortises_the_replica_all_reduce():
    replicas = Strategy.mics(1)  # each node holds a full copy: only the all-reduce crosses nodes
    ar = 2 * 0.5 * 4e8 / 1e9  # fp32 gradients of one 1e8-parameter block between 2 replicas: 0.4 s
    once = step_time(TOY, SLOW, 2, replicas, micro_batch=1, accum=4)
    every = step_time(TOY, SLOW, 2, dataclasses.replace(replicas, two_hop=False), micro_batch=1, accum=4)
    forward = once.compute / 4 / 3
    backward, synced = 2 * forward, forward + 10 * ar + 2 * forward / 10  # each block's sync after its backward
    assert once.total == pytest.approx(3 * (forward + backward) + synced + once.optimizer)
    assert every.total == pytest.approx(4 * synced + every.optimizer)
    assert (once.all_reduce, every.all_reduce) == (pytest.approx(10 * ar), pytest.approx(40 * ar))


def test_optimizer_over_replicas_moves_the_all_reduce_bytes_as_two_halves():
    """Reduce-scatter in backward (each block's half hides like the all-reduce), all-gather after the step."""
    plain = Strategy.mics(1, param_bytes=4)  # fp32 everywhere, so both hops move the same bytes
    sharded = dataclasses.replace(plain, optimizer_over_replicas=True)
    a, b = (step_time(TOY, SLOW, 2, s, micro_batch=1, accum=4) for s in (plain, sharded))
    half = 0.5 * 4e8 / 1e9  # one block's fp32 gradient (or parameters) over 2 replicas, one pass: 0.2 s
    forward = a.compute / 4 / 3
    synced = forward + 10 * half + 2 * forward / 10
    assert b.total == pytest.approx(3 * 3 * forward + synced + 10 * half + b.optimizer)
    assert b.all_reduce == pytest.approx(a.all_reduce)
    assert b.optimizer == pytest.approx(a.optimizer / 2)  # AdamW over 1/W instead of 1/P of the states


def test_replica_hop_has_its_own_dtype_in_the_cost_model():
    fp32 = Strategy.mics(1, reduce_bytes=4)
    bf16_hop = dataclasses.replace(fp32, replica_reduce_bytes=2)
    a, b = (step_time(TOY, SLOW, 2, s, micro_batch=1, accum=4) for s in (fp32, bf16_hop))
    assert b.all_reduce == pytest.approx(a.all_reduce / 2)
    assert b.reduce_scatter == pytest.approx(a.reduce_scatter)  # the partition hop keeps its dtype


def test_partition_must_be_node_aligned():
    with pytest.raises(ValueError, match="node-aligned"):
        step_time(ONE_B, get_profile("p4d"), 3, Strategy.mics(12), micro_batch=1)
    with pytest.raises(ValueError, match="node-aligned"):
        estimate_memory(ONE_B, Strategy.mics(12), 24, 8, micro_batch=1)


# --- planner ------------------------------------------------------------------------------------

BIG = ModelSpec.from_preset("mics-100b")
P4D = PROFILES["p4d"]
BF16_REDUCE = Strategy("mics", reduce_bytes=2)


def test_planner_recommends_smallest_partition_that_fits_when_memory_is_tight():
    candidates = plan(BIG, P4D, nodes=16, micro_batch=4, accum=4, activation_checkpointing=True, options=BF16_REDUCE)
    assert [c.partition_size for c in candidates if not c.fits] == [1, 2, 4, 8, 16, 16, 32, 32]
    best = recommend(candidates)
    assert (best.partition_size, best.label) == (64, "mics P=64 hier")
    table = render_table(candidates, highlight=best)
    assert "| * | mics P=64 hier" in table and table.count("\n") == len(candidates) + 1


def test_planner_breaks_near_ties_towards_the_smaller_partition():
    # 13B on fast 3200 Gbps nodes: every partition hides its communication behind compute, and
    # accumulation amortises the optimizer step (which shrinks with P)
    candidates = plan(
        ModelSpec.from_shape(40, 5120, 40, 2048, 50304),
        PROFILES["h100-3200"],
        nodes=4,
        micro_batch=2,
        accum=4,
        activation_checkpointing=True,
    )
    fastest = max((c for c in candidates if c.fits), key=lambda c: c.cost.tokens_per_s_per_gpu)
    best = recommend(candidates)
    assert best.partition_size == min(c.partition_size for c in candidates if c.fits) < fastest.partition_size
    assert best.cost.tokens_per_s_per_gpu >= 0.99 * fastest.cost.tokens_per_s_per_gpu


def test_planner_explains_when_nothing_fits():
    with pytest.raises(ValueError, match=r"needs \d+\.\d GiB per GPU even at partition = world \(8 GPUs"):
        recommend(plan(BIG, P4D, nodes=1, micro_batch=1))


def test_evaluate_zero3_equals_planner_flat_world_partition():
    zero3 = evaluate(BIG, P4D, 16, Strategy.zero3(), micro_batch=4, accum=4)
    flat = next(c for c in plan(BIG, P4D, 16, micro_batch=4, accum=4) if c.label == "mics P=128 flat")
    assert zero3.cost == flat.cost and zero3.memory == flat.memory


# --- simulator: the MiCS paper's setting (p4d, 100B-class model, 128 -> 512 GPUs) -----------------


@pytest.fixture(scope="module")
def paper_rows():
    rows = simulate(
        BIG, P4D, micro_batch=4, accum=4, activation_checkpointing=True, gpus=[128, 256, 512], options=BF16_REDUCE
    )
    return {(r.gpus, r.strategy): r for r in rows}


def test_simulator_mics_scales_near_linearly_on_the_paper_setting(paper_rows):
    assert paper_rows[512, "mics"].efficiency >= 0.95
    assert paper_rows[512, "mics"].partition_size == 64
    assert (512, "ddp") not in paper_rows  # 1.6 TB of model states do not fit one GPU


def test_simulator_zero3_falls_behind_mics_at_scale(paper_rows):
    assert paper_rows[512, "zero3"].efficiency < paper_rows[512, "mics"].efficiency - 0.05
    assert paper_rows[512, "mics"].tokens_per_s_per_gpu > 1.1 * paper_rows[512, "zero3"].tokens_per_s_per_gpu


@pytest.mark.xfail(
    strict=True,
    reason="not physics the alpha-beta model has: at P >= 64 MiCS spans 8 nodes too, and a ring moves "
    "(p-1)/p of each unit through every node whatever p is (see torchmics.plan.simulate's docstring)",
)
def test_simulator_reproduces_the_papers_zero3_gap(paper_rows):
    assert paper_rows[512, "zero3"].efficiency < 0.80
    assert paper_rows[512, "mics"].tokens_per_s_per_gpu >= 2 * paper_rows[512, "zero3"].tokens_per_s_per_gpu


def test_simulator_outputs(tmp_path, paper_rows):
    rows = list(paper_rows.values())
    md, jsonl, png = write_outputs(rows, tmp_path, title="p4d, 100B")
    assert md.read_text().startswith("# p4d, 100B") and "mics P=64 hier" in md.read_text()
    assert [json.loads(line)["gpus"] for line in jsonl.read_text().splitlines()] == [r.gpus for r in rows]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulator_rejects_partial_nodes():
    with pytest.raises(ValueError, match="whole nodes"):
        simulate(BIG, P4D, micro_batch=1, gpus=[12])


# --- calibration --------------------------------------------------------------------------------


def _collective_lines(link: LinkClass, nodes: int, gpus_per_node: int, algo: str = "flat") -> list[dict]:
    """What `torchmics bench --collectives` would measure on ``link`` (2 ranks, 1 MiB to 1 GiB)."""
    line = {"kind": "collective", "op": "all_gather", "algo": algo, "ranks": 2, "nodes": nodes}
    return [
        {**line, "gpus_per_node": gpus_per_node, "bytes": n, "time_s": link.alpha + n / 2 / link.beta}
        for n in (2**20, 2**24, 2**30)
    ]


def _numbers(link: LinkClass) -> tuple[float, float]:
    return link.alpha, link.beta


def test_fit_link_recovers_alpha_and_beta():
    truth = LinkClass(alpha=150e-6, beta=2.9e9)
    assert _numbers(fit_link(LINKS["inter"], _collective_lines(truth, 2, 1))) == pytest.approx(_numbers(truth))
    one_size = _collective_lines(truth, 2, 1)[-1:]  # latency kept, bandwidth fitted
    assert _numbers(fit_link(truth, one_size)) == pytest.approx(_numbers(truth))
    assert fit_link(truth, []) == truth


def _bench_record(system: str, **fields) -> dict:
    run = {"system": system, "model": "1.4b", "seq_len": 2048, "micro_batch": 4, "accum": 1, "partition_size": 2}
    shape = {"nodes": 1, "gpus_per_node": 2, "emulated": False, "param_dtype": "bf16", "reduce_dtype": "bf16"}
    return run | shape | fields


def test_calibration_round_trip(tmp_path):
    pytest.importorskip("torchmics.models.gpt")
    truth = dataclasses.replace(
        PROFILES["emulated-h200"], intra=LinkClass(3e-6, 180e9), inter=LinkClass(50e-6, 4.2e9), compute_mfu=0.47
    )
    runs = [_bench_record("fsdp2-full"), _bench_record("ddp", partition_size=1), _bench_record("torchmics", accum=4)]
    for run in runs:  # what these runs would measure on the truth
        run["tokens_per_s_per_gpu"] = predict_record(truth, run)[0].tokens_per_s_per_gpu
        run["mfu"] = run["tokens_per_s_per_gpu"] * 9e9 / truth.peak_flops
    emulated = _bench_record("fsdp2-full", nodes=2, gpus_per_node=1, emulated=True, tokens_per_s_per_gpu=1.0, mfu=0.01)
    lines = [
        *_collective_lines(truth.intra, nodes=1, gpus_per_node=2),
        *_collective_lines(truth.inter, nodes=2, gpus_per_node=2),
        *_collective_lines(LinkClass(0.0, 1e15), nodes=2, gpus_per_node=2, algo="hierarchical"),  # mixed links
        *runs,
        emulated,  # a prediction target, never fitted to
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fitted = calibrate(PROFILES["emulated-h200"], path)
    assert _numbers(fitted.intra) == pytest.approx(_numbers(truth.intra))
    assert _numbers(fitted.inter) == pytest.approx(_numbers(truth.inter))
    assert fitted.compute_mfu == pytest.approx(truth.compute_mfu, rel=1e-6)
    assert fitted.name == "emulated-h200-calibrated" and "Calibrated from" in fitted.source
    assert calibrate(fitted, path).name == fitted.name  # calibrating twice does not stack suffixes


def test_calibration_from_nodes_of_another_size(tmp_path):
    """Emulated 2x1 lines calibrate a 2-GPU-per-node profile: a node of 2 has twice a 1-GPU node's sockets."""
    one_gpu_nodes = LinkClass(50e-6, 3.6e9)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in _collective_lines(one_gpu_nodes, nodes=2, gpus_per_node=1)))
    fitted = calibrate(PROFILES["emulated-h200"], path)
    assert PROFILES["emulated-h200"].gpus_per_node == 2
    assert _numbers(fitted.inter) == pytest.approx((50e-6, 2 * 3.6e9))
    assert _numbers(with_gpus_per_node(fitted, 1).inter) == pytest.approx(_numbers(one_gpu_nodes))


def test_calibration_keeps_what_the_results_do_not_measure(tmp_path):
    path = tmp_path / "results.jsonl"
    failed = {"system": "ddp", "nodes": 1, "emulated": False, "status": "failed"}
    cpu = {"system": "ddp", "nodes": 1, "emulated": False, "mfu": None}
    path.write_text(json.dumps(failed) + "\n" + json.dumps(cpu) + "\n")
    fitted = calibrate(P4D, path)
    assert (fitted.intra, fitted.inter, fitted.compute_mfu) == (P4D.intra, P4D.inter, P4D.compute_mfu)
    assert fitted.source.endswith("nothing usable.")


# --- validation: the calibrated models against our own measurements (2x H100) --------------------

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
NVLINK, EMULATED = RESULTS / "h100-nvlink-1x2" / "results.jsonl", RESULTS / "h100-emulated-2x1" / "results.jsonl"
CHECKS = committed_checks(RESULTS)  # every run predicted by a profile calibrated without it


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.setting}/{c.record['system']}" for c in CHECKS])
def test_models_predict_every_bench_run(check):
    assert abs(check.throughput_error) <= 0.15, f"predicted {check.tokens_per_s_per_gpu:,.0f} tok/s/GPU"
    assert abs(check.memory_error) <= 0.15, f"predicted {check.memory_gib:.1f} GiB"


PRECISION = RESULTS / "h200-emulated-2x1-precision" / "results.jsonl"


@pytest.mark.parametrize("record", training_records(read_jsonl(PRECISION)),
                         ids=lambda r: f"{r['system']}-{r['reduce_dtype']}-{r.get('replica_reduce_dtype')}")
def test_memory_model_predicts_the_precision_runs(record):
    """The fp32-vs-bf16 replica hop call, outside COMMITTED: the cost model predicts its fp32 runs 16-17%
    fast (within the +-10% spread between calls on that setup, plus the model's own error, but past 15%),
    so only its memory is held to 15% here."""
    _, memory = predict_record(PROFILES["emulated-h200"], record)
    assert memory.total_gib == pytest.approx(record["peak_mem_gib"], rel=0.15)


def test_bench_runs_cover_every_strategy():
    predicted = [RESULTS / folders[-1] / "results.jsonl" for _, folders in COMMITTED]
    assert len(CHECKS) == sum(len(training_records(read_jsonl(path))) for path in predicted)
    systems = {c.record["system"] for c in CHECKS}
    assert systems >= {"torchmics", "torchmics-no-two-hop", "torchmics-replica-optimizer", "fsdp2-full", "fsdp2-hsdp", "ddp"}
    assert record_strategy(next(c.record for c in CHECKS if c.record["system"] == "ddp")).two_hop is False
    earlier = next(c.record for c in CHECKS if c.record["system"] == "torchmics-replica-optimizer")
    renamed = record_strategy(earlier | {"system": "torchmics-optimizer-over-replicas"})
    assert record_strategy(earlier) == renamed and renamed.optimizer_over_replicas


def test_validation_leaves_the_predicted_run_out(tmp_path):
    run = next(c for c in CHECKS if c.record["system"] == "torchmics" and not c.record["emulated"])
    doubled = {**run.record, "tokens_per_s_per_gpu": 2 * run.record["tokens_per_s_per_gpu"]}
    path = tmp_path / "h100-nvlink-1x2" / "results.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in [*read_jsonl(NVLINK), doubled]))
    (check,) = [c for c in leave_one_out(PROFILES["h100-3200"], [path]) if c.record == doubled]
    assert check.tokens_per_s_per_gpu == pytest.approx(run.tokens_per_s_per_gpu, rel=0.02)  # not fitted to itself
    first_row = render_checks(CHECKS).splitlines()[2]
    assert [cell.strip() for cell in first_row.split("|")[1:3]] == [CHECKS[0].setting, CHECKS[0].record["system"]]


def test_shipped_emulated_h100_profile_is_its_calibration():
    shipped = PROFILES["emulated-h100"]
    fitted = calibrate(calibrate(shipped, NVLINK), EMULATED)
    assert _numbers(shipped.inter) == pytest.approx(_numbers(fitted.inter), rel=0.01)
    assert shipped.compute_mfu == pytest.approx(fitted.compute_mfu, rel=0.01)
    assert PROFILES["h100-3200"].compute_mfu == shipped.compute_mfu


# --- `torchmics train --partition-size auto` ---------------------------------------------------


def test_gpu_profile_follows_the_device():
    assert gpu_profile("NVIDIA H100 80GB HBM3", 79.1).name == "h100-3200"
    assert gpu_profile("NVIDIA H100 80GB HBM3", 79.1).hbm_gib == 79.1  # what the device reports
    assert gpu_profile("NVIDIA H200", 139.8).name == "h200-3200"
    assert gpu_profile("NVIDIA A100-SXM4-40GB", 39.4).name == "p4d"
    assert gpu_profile("NVIDIA A100-SXM4-80GB", 79.2).name == "a100-80gb-3200"
    unknown = gpu_profile("NVIDIA L40S", 44.4)
    assert (unknown.name, unknown.hbm_gib) == ("local-nvidia-l40s", 44.4)
    assert "Unknown GPU 'NVIDIA L40S'" in unknown.source and "a100-80gb-3200" in unknown.source


def test_job_cluster_of_emulated_nodes_talks_over_sockets():
    real = job_cluster("NVIDIA H100 80GB HBM3", 79.1, gpus_per_node=2, emulated=False)
    assert (real.gpus_per_node, real.inter) == (2, PROFILES["h100-3200"].inter)  # a node keeps its NICs
    one, two = (job_cluster("NVIDIA H100 80GB HBM3", 79.1, k, emulated=True) for k in (1, 2))
    assert one.emulated and one.inter == PROFILES["emulated-h100"].inter
    assert two.inter.beta == 2 * one.inter.beta  # every GPU's sockets are its own


def _fake_gpu(monkeypatch, name: str, memory_gib: float) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    properties = SimpleNamespace(total_memory=memory_gib * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    monkeypatch.setattr(auto, "host_memory_gib", lambda: 1024.0)  # a GPU node's host, not this machine's


def test_auto_partition_size_is_the_planners(monkeypatch):
    gpt = pytest.importorskip("torchmics.models.gpt")
    from torchmics.train.config import TrainConfig
    from torchmics.train.resolve import planner_job, resolve_partition_size

    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 79.1)
    cfg = TrainConfig(model="1.4b", micro_batch=4, accum=4, mixed_precision="bf16", emulate_nodes=2)
    info = gpt.ModelInfo("1.4b", gpt.PRESETS["1.4b"].num_params(), 24, 2048, 50304, 2048, 9074454528)
    cluster = job_cluster("NVIDIA H100 80GB HBM3", 79.1, 1, emulated=True)
    expected = recommend(plan(ModelSpec.from_preset("1.4b"), cluster, 2, 4, 4, options=Strategy("mics"))).partition_size
    assert resolve_partition_size(cfg, info, world=2, gpus_per_node=1) == expected == 1  # two-hop over sockets
    big = gpt.ModelInfo("13b", gpt.PRESETS["13b"].num_params(), 40, 5120, 50304, 2048, 0)
    one_node = dataclasses.replace(cfg, emulate_nodes=None, activation_checkpointing=True)
    assert recommend_partition_size(big, planner_job(one_node, 8, 8)) > 1  # 13B needs sharding on 80 GB GPUs
    with pytest.raises(ValueError, match="even at partition = world"):
        recommend_partition_size(big, planner_job(one_node, 1, 1))


def test_auto_knows_every_option_that_changes_memory():
    """Sharding the optimizer over replicas frees memory, so auto may choose a smaller partition."""
    gpt = pytest.importorskip("torchmics.models.gpt")
    from torchmics.train.config import TrainConfig
    from torchmics.train.resolve import planner_job

    info = gpt.ModelInfo("6.7b", gpt.PRESETS["6.7b"].num_params(), 32, 4096, 50304, 2048, 0)
    cluster = _cluster(gpus_per_node=8, hbm_gib=40)
    cfg = TrainConfig(model="6.7b", micro_batch=1, accum=4, mixed_precision="bf16", activation_checkpointing=True)
    plain = recommend_partition_size(info, planner_job(cfg, 64, 8), cluster)
    sharded_cfg = dataclasses.replace(cfg, optimizer_over_replicas=True, replica_reduce_dtype="bf16")
    sharded_job = planner_job(sharded_cfg, 64, 8)
    assert sharded_job.options.optimizer_over_replicas and sharded_job.options.replica_hop_bytes == 2
    sharded = recommend_partition_size(info, sharded_job, cluster)
    assert sharded < plain, (sharded, plain)


def test_cpu_offload_moves_model_states_to_the_host():
    model = ModelSpec.from_preset("6.7b")
    on_gpu = estimate_memory(model, Strategy.mics(8), 64, 8, micro_batch=1)
    offloaded = Strategy.mics(8, cpu_offload=True)
    moved = estimate_memory(model, offloaded, 64, 8, micro_batch=1)
    states = on_gpu.params + on_gpu.grads + on_gpu.optimizer
    assert on_gpu.total - moved.total == pytest.approx(states)
    host = estimate_host_memory(model, offloaded, 64, 8)
    assert host.training - estimate_host_memory(model, Strategy.mics(8), 64, 8).training == pytest.approx(
        (4 + 4 + 8) * model.num_params / 8)  # fp32 params, grads and AdamW's two moments, per rank


def test_host_memory_is_a_limit_the_plan_names():
    model = ModelSpec.from_preset("13b")
    cluster = _cluster(gpus_per_node=8, hbm_gib=80, host_gib=128)
    candidates = plan(model, cluster, 4, 1, 1, True, Strategy("mics", cpu_offload=True))
    limits = {c.partition_size: c.limit for c in candidates}
    assert limits[8] == "host" and limits[32] is None  # 13B's offloaded states need more than a node's host
    best = recommend(candidates)
    assert "of host memory usable per rank" in explain(candidates, best)
    with pytest.raises(ValueError, match="host memory per rank"):
        recommend(plan(model, cluster, 1, 1, 1, True, Strategy("mics", cpu_offload=True)))


def test_failure_cost_with_and_without_fault_tolerant_replica_groups():
    # 64 GPUs in groups of 8, 2 s steps, a checkpoint every 500 steps, 300 s to restart: without fault
    # tolerance all 64 GPUs redo 250 steps (500 s) and wait 300 s; with it only the failed group's 8 wait.
    cost = failure_cost(64, 8, step_s=2.0, checkpoint_every=500, restart_s=300.0)
    assert cost.without_ft_gpu_hours == pytest.approx(64 * 800 / 3600)
    assert cost.with_ft_gpu_hours == pytest.approx(8 * 300 / 3600)
    assert cost.redone_steps_without_ft == 250
    assert cost.saving == pytest.approx(64 * 800 / (8 * 300))
    with pytest.raises(ValueError, match="partition size 3 must divide the world size 64"):
        failure_cost(64, 3, 2.0, 500, 300.0)


def test_one_partition_group_gains_nothing_from_fault_tolerance():
    # P = world: the failed group is the whole job, with no live group to copy the states from.
    cost = failure_cost(16, 16, step_s=2.0, checkpoint_every=500, restart_s=300.0)
    assert cost.with_ft_gpu_hours == cost.without_ft_gpu_hours == pytest.approx(16 * 800 / 3600)
    line = describe_failure(cost, 16, 16, 500, 300.0)
    assert "loses as much: at P = 16 = world there is one partition group" in line and "less)" not in line


def test_one_rank_partitions_keep_units_gathered_unless_that_does_not_fit(monkeypatch):
    """At P = 1 train keeps every unit gathered from forward to backward (a bf16 copy of the model); where
    that copy is what does not fit, the planner and train reshard instead of refusing the job."""
    gpt = pytest.importorskip("torchmics.models.gpt")
    from torchmics.train.config import TrainConfig
    from torchmics.train.resolve import resolve_reshard_after_forward

    model = ModelSpec.from_name("6.7b")
    outside_root_and_two_blocks = model.num_params - model.embedding_params - 2 * model.layer_params
    choices = {}
    for memory_gib in (141, 120, 100):
        gpu = dataclasses.replace(PROFILES["h200-3200"], gpus_per_node=1, hbm_gib=memory_gib)
        (candidate,) = plan(model, gpu, 1, 1, 1, True)
        choices[memory_gib] = (candidate.label, candidate.fits)
    assert choices == {141: ("mics P=1", True), 120: ("mics P=1 resharded", True), 100: ("mics P=1 resharded", False)}
    kept, resharded = (estimate_memory(model, Strategy.mics(1, reshard_after_forward=r), 1, 1, 1, True) for r in (None, True))
    assert kept.total - resharded.total == 2 * outside_root_and_two_blocks

    info = gpt.ModelInfo("6.7b", gpt.PRESETS["6.7b"].num_params(), 32, 4096, 50304, 2048, 0)
    cfg = TrainConfig(model="6.7b", micro_batch=1, mixed_precision="bf16", activation_checkpointing=True)
    for memory_gib, expected in ((141, False), (120, True)):
        _fake_gpu(monkeypatch, "NVIDIA H200", memory_gib)
        assert resolve_reshard_after_forward(cfg, info, 1, 1, partition_size=1) is expected
    assert resolve_reshard_after_forward(cfg, info, 2, 2, partition_size=2) is True  # only one-rank groups keep them


def test_memory_model_predicts_a_one_rank_partition_with_units_kept_gathered():
    """The eager 1.4b run on one H200 (P = 1, every unit gathered from forward to backward), measured by bench."""
    records = [r for r in read_jsonl(RESULTS / "h200-train-1x1" / "results.jsonl")
               if r["system"] == "torchmics" and not r["compiled"]]
    assert records
    for record in records:
        record = {"reshard_after_forward": False} | record  # how bench ran it; the field came after this call
        _, memory = predict_record(PROFILES["h200-3200"], record)
        assert memory.total_gib == pytest.approx(record["peak_mem_gib"], rel=0.15)
