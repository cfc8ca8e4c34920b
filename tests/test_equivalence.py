"""torchmics training equals single-process training on the same global batch (docs/design.md §3)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import torchmics
from dist_utils import run_ranks
from toy import PartlyUsedToyModel, ToyModel, lm_loss, make_batches, reference_training
from traffic import record_traffic

STEPS, ACCUM = 3, 2


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=37, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


BUILDERS = {"toy": ToyModel, "partly-used": PartlyUsedToyModel, "llama": build_llama, "gpt2": build_gpt2}


def sharded_training(gpus_per_node: int, partition_size: int, builder: str, batches: torch.Tensor,
                     replica_reduce_dtype: torch.dtype | None = None, optimizer_over_replicas: bool = False,
                     param_dtype: torch.dtype | None = None, offload: bool = False, reshard_after_forward: bool = True):
    """Runs on every rank: shard, train with two-hop accumulation, return losses, weights, traffic."""
    topo = torchmics.init_mesh(partition_size=partition_size, gpus_per_node=gpus_per_node)
    torch.manual_seed(0)
    reduce_dtype = torch.float32 if param_dtype is not None else None  # bf16 compute, fp32 reduction
    precision = torchmics.MixedPrecision(param_dtype, reduce_dtype, replica_reduce_dtype)
    model = torchmics.shard(BUILDERS[builder](), topo, mixed_precision=precision,
                            shard_optimizer_across_replicas=optimizer_over_replicas, offload=offload,
                            reshard_after_forward=reshard_after_forward)
    if optimizer_over_replicas:
        opt = torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, replica_all_reduces, replica_reduce_scatters = [], [], []
    with record_traffic() as traffic:
        for step_batches in batches:
            before = _replica_hops(traffic, topo)
            step_loss = torch.zeros(())
            for i, micro in enumerate(step_batches):
                last = i == len(step_batches) - 1
                with contextlib.nullcontext() if last else torchmics.no_replica_sync(model):
                    loss = lm_loss(model, micro.chunk(world)[rank]) / len(step_batches)
                    loss.backward()
                step_loss += loss.detach()
            after = _replica_hops(traffic, topo)  # counted before the optimizer step: during backward
            replica_all_reduces.append(after["all_reduce"] - before["all_reduce"])
            replica_reduce_scatters.append(after["reduce_scatter_single"] - before["reduce_scatter_single"])
            torchmics.clip_grad_norm_(model, 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(step_loss)
    for loss in losses:
        dist.all_reduce(loss)
    units = sum(1 for m in model.modules() if isinstance(m, torch.distributed.fsdp.FSDPModule))
    return {
        "losses": [loss.item() / world for loss in losses],
        "state": torchmics.full_state_dict(model),
        "local_shards": {name: p.to_local().clone() for name, p in model.named_parameters()},
        "traffic": dict(traffic),
        "replica_all_reduces": replica_all_reduces,
        "replica_reduce_scatters": replica_reduce_scatters,
        "units": units,
        "optimizer_state_numel": sum(t.numel() for state in (opt.inner if optimizer_over_replicas else opt).state.values()
                                     for t in state.values() if t.dim()),
        "shard_numel": sum(p.to_local().numel() for p in model.parameters() if p.requires_grad),
        "trainable_tensors": sum(1 for p in model.parameters() if p.requires_grad),
        "topology": (topo.partition_groups, topo.inter_groups, topo.intra_groups),
    }


def _replica_hops(traffic, topo) -> dict[str, int]:
    """Collectives run so far on this rank's replication group, by name."""
    replicas = topo.replication_groups[topo.shard_index(topo.rank)]
    if len(replicas) == 1:
        return {"all_reduce": 0, "reduce_scatter_single": 0}
    return {kind: traffic.get((kind, replicas), 0) for kind in ("all_reduce", "reduce_scatter_single")}


def assert_matches_reference(result, builder: str, batches: torch.Tensor, tolerance: float = 1e-5) -> None:
    ref_losses, ref_state = reference_training(BUILDERS[builder], batches)
    assert result["losses"] == pytest.approx(ref_losses, rel=tolerance)
    assert set(result["state"]) == set(ref_state)
    for name, expected in ref_state.items():
        torch.testing.assert_close(result["state"][name], expected, rtol=tolerance, atol=tolerance,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _several(cases: list[tuple]) -> list[dict]:
    """Several trainings in one job (each builds its own mesh): one process start for all of them."""
    return [sharded_training(*case) for case in cases]


# (GPUs per node, partition size) on 4 ranks: flat P 1, 2, 4; 2x2 hierarchical; 4 nodes of 1.
FOUR_RANK_TOPOLOGIES = {"w4-p1": (4, 1), "w4-p2": (4, 2), "w4-p4": (4, 4), "2x2-p4-hier": (2, 4), "4x1-p4": (1, 4)}


def _assert_toy_case(results: list[dict], world: int, partition: int, batches: torch.Tensor) -> None:
    assert_matches_reference(results[0], "toy", batches)
    assert results[0]["losses"] == results[-1]["losses"]
    for result in results:  # two-hop: exactly one replica all-reduce per unit per optimizer step
        expected = result["units"] if world // partition > 1 else 0
        assert result["replica_all_reduces"] == [expected] * STEPS


def test_toy_model_matches_single_process_on_four_ranks():
    """Every 4-rank topology, and CPU offload (FSDP2's offload path; on CPU ranks the host is the device)."""
    batches = make_batches(STEPS, ACCUM, global_batch=8)
    cases = [(gpus, p, "toy", batches) for gpus, p in FOUR_RANK_TOPOLOGIES.values()]
    cases.append((2, 4, "toy", batches, None, False, None, True))
    per_rank = run_ranks(_several, 4, cases, nodes=2)
    for i, (_, partition) in enumerate(FOUR_RANK_TOPOLOGIES.values()):
        _assert_toy_case([rank[i] for rank in per_rank], 4, partition, batches)
    assert_matches_reference(per_rank[0][-1], "toy", batches)  # offloaded


def test_toy_model_matches_single_process_on_eight_ranks():
    """4 nodes x 2, partition 4 (hierarchical), 2 replicas."""
    batches = make_batches(STEPS, ACCUM, global_batch=16)
    results = run_ranks(sharded_training, 8, 2, 4, "toy", batches, nodes=4)
    _assert_toy_case(results, 8, 4, batches)


def test_hierarchical_path_carries_the_traffic():
    """On 2 nodes x 2, partition 4: gathers run on inter/intra sub-groups, never on the flat group."""
    batches = make_batches(1, 1, global_batch=4)
    result = run_ranks(sharded_training, 4, 2, 4, "toy", batches, nodes=2)[0]
    partition_groups, inter_groups, intra_groups = result["topology"]
    assert inter_groups == ((0, 2), (1, 3)) and intra_groups == ((0, 1), (2, 3))
    traffic = result["traffic"]
    for collective in ("all_gather_single", "reduce_scatter_single"):
        assert traffic.get((collective, (0, 1, 2, 3)), 0) == 0, f"flat {collective} ran"
        assert traffic.get((collective, (0, 2)), 0) > 0, f"no inter-node {collective}"
        assert traffic.get((collective, (0, 1)), 0) > 0, f"no intra-node {collective}"


def test_transformers_models_match_single_process():
    batches = make_batches(2, ACCUM, global_batch=8)
    per_rank = run_ranks(_several, 4, [(2, 4, builder, batches) for builder in ("llama", "gpt2")], nodes=2)
    for i, builder in enumerate(("llama", "gpt2")):
        assert_matches_reference(per_rank[0][i], builder, batches)


@pytest.mark.parametrize("world,nodes,partition", [(4, 2, 2), (8, 4, 4)], ids=["2x2-p2", "4x2-p4-hier"])
def test_replica_hop_in_its_own_dtype(world, nodes, partition):
    """Precision per hop: torchmics runs the replica all-reduce (fp32 exact, bf16 to bf16 tolerance)."""
    batches = make_batches(STEPS, ACCUM, global_batch=world * 2)
    cases = [(world // nodes, partition, "toy", batches, dtype) for dtype in (torch.float32, torch.bfloat16)]
    per_rank = run_ranks(_several, world, cases, nodes=nodes)
    for i, tolerance in enumerate((1e-5, 2e-2)):
        assert_matches_reference(per_rank[0][i], "toy", batches, tolerance)
        for rank in per_rank:
            assert rank[i]["replica_all_reduces"] == [rank[i]["units"]] * STEPS


@pytest.mark.parametrize("world,nodes,partition", [(4, 2, 2), (8, 4, 4)], ids=["2x2-p2", "4x2-p4-hier"])
def test_optimizer_sharded_across_replicas(world, nodes, partition):
    """Optimizer state over replicas: same training as single-process, 1/R of AdamW's two moments."""
    batches = make_batches(STEPS, ACCUM, global_batch=world * 2)
    results = run_ranks(sharded_training, world, world // nodes, partition, "toy", batches, None, True, nodes=nodes)
    assert_matches_reference(results[0], "toy", batches)
    replicas = world // partition
    for result in results:
        assert result["replica_all_reduces"] == [0] * STEPS  # the replica hop is a reduce-scatter now,
        assert result["replica_reduce_scatters"] == [result["units"]] * STEPS  # one per unit, during backward
        moments = 2 * result["shard_numel"]  # what a plain AdamW keeps on this rank
        padding = 2 * result["trainable_tensors"]  # uneven slices: at most one element per tensor and moment
        assert moments / replicas - padding <= result["optimizer_state_numel"] <= moments / replicas + padding


def test_one_rank_partitions_kept_gathered_match_single_process():
    """P = 1 as train runs it (units kept gathered from forward to backward, FSDP2's world-size-1 copies
    skipped), two replicas, with each replica hop: FSDP2's, torchmics' own, the optimizer over replicas."""
    batches = make_batches(STEPS, ACCUM, global_batch=4)
    hops = [(None, False), (torch.float32, False), (None, True)]
    cases = [(1, 1, "toy", batches, dtype, over_replicas, None, False, False) for dtype, over_replicas in hops]
    for result in run_ranks(_several, 2, cases, nodes=2)[0]:
        assert_matches_reference(result, "toy", batches)


@pytest.mark.parametrize("replica_hop", ["torchmics-all-reduce", "optimizer-over-replicas"])
def test_torchmics_replica_hops_with_partly_used_units(replica_hop):
    """A parameter no forward uses gets no update; a unit used only in the deferred micro-step is still
    reduced across replicas (at the end of the last backward)."""
    batches = make_batches(STEPS, ACCUM, global_batch=8)
    dtype, over_replicas = (torch.float32, False) if replica_hop == "torchmics-all-reduce" else (None, True)
    results = run_ranks(sharded_training, 4, 2, 2, "partly-used", batches, dtype, over_replicas, nodes=2)
    assert_matches_reference(results[0], "partly-used", batches)  # unused weights included: never stepped


def test_training_a_model_sharded_for_the_replica_optimizer_needs_it():
    run_ranks(_forward_without_replica_optimizer, 4, 2, nodes=2)


def _forward_without_replica_optimizer(gpus_per_node: int):
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=gpus_per_node)
    model = torchmics.shard(ToyModel(), topo, shard_optimizer_across_replicas=True)
    tokens = make_batches(1, 1, 2)[0, 0]
    with torch.no_grad():
        model(tokens[:, :-1])  # evaluation is fine
    with pytest.raises(RuntimeError, match="ReplicaShardedOptimizer"):
        model(tokens[:, :-1])


def test_optimizer_over_replicas_with_bf16_compute_equals_plain_mics():
    """Gathering updated slices in bf16 loses nothing: bf16 training is the same as plain two-hop MiCS."""
    batches = make_batches(STEPS, ACCUM, global_batch=8)
    args = (2, 2, "toy", batches, None)
    plain = run_ranks(sharded_training, 4, *args, False, torch.bfloat16, nodes=2)[0]
    sharded = run_ranks(sharded_training, 4, *args, True, torch.bfloat16, nodes=2)[0]
    assert sharded["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    for name, value in plain["state"].items():  # full precision master weights, after synchronization
        torch.testing.assert_close(sharded["state"][name], value, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
