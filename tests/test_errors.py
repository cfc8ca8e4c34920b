"""Misuse raises a clear error before any collective can hang."""

import pytest
import torch
import torch.nn as nn

import torchmics
from dist_utils import run_ranks
from toy import ToyBlock, ToyModel


def test_init_mesh_without_process_group_or_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        torchmics.init_mesh(partition_size=1)


def test_shard_needs_live_groups():
    with pytest.raises(ValueError, match="init_mesh"):
        torchmics.shard(ToyModel(), torchmics.plan_topology(4, 2, 4))


def test_no_replica_sync_and_clip_need_a_sharded_model():
    with pytest.raises(ValueError, match="torchmics.shard"):
        with torchmics.no_replica_sync(nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="torchmics.shard"):
        torchmics.clip_grad_norm_(nn.Linear(2, 2), 1.0)


def _misuse_on_every_rank() -> dict[str, str]:
    """Each misuse, caught on every rank; the job must finish (no rank left waiting in a collective)."""
    errors = {}

    def attempt(name, fn):
        try:
            fn()
        except (ValueError, RuntimeError, TypeError) as err:
            errors[name] = f"{type(err).__name__}: {err}"

    attempt("bad_partition", lambda: torchmics.init_mesh(partition_size=3))
    attempt("zero_partition", lambda: torchmics.init_mesh(partition_size=0))
    attempt("zero_gpus_per_node", lambda: torchmics.init_mesh(partition_size=2, gpus_per_node=0))
    topo = torchmics.init_mesh(partition_size=2)
    model = torchmics.shard(ToyModel(), topo)
    attempt("shard_twice", lambda: torchmics.shard(model, topo))
    attempt("topology_not_a_topology", lambda: torchmics.shard(ToyModel(), 2))
    attempt("forced_hierarchy", lambda: torchmics.shard(ToyModel(), topo, hierarchical=True))
    attempt("tied_unit", lambda: torchmics.shard(ToyModel(), topo, wrap=(nn.Embedding, ToyBlock)))
    attempt("wrap_not_classes", lambda: torchmics.shard(ToyModel(), topo, wrap=[ToyBlock]))
    attempt("wrap_absent", lambda: torchmics.shard(ToyModel(), topo, wrap=(nn.Conv2d,)))
    with torch.device("meta"):
        on_meta = ToyModel()  # its buffer too, so its values are lost
    attempt("meta_buffers", lambda: torchmics.shard(on_meta, topo))
    attempt("meta_buffers_again", lambda: torchmics.shard(on_meta, topo))  # untouched: the same error

    def nested():
        with torchmics.no_replica_sync(model):
            with torchmics.no_replica_sync(model):
                pass

    attempt("nested_no_sync", nested)

    def clip_inside():
        with torchmics.no_replica_sync(model):
            model(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
            torchmics.clip_grad_norm_(model, 1.0)

    attempt("clip_in_no_sync", clip_inside)
    attempt("clip_negative", lambda: torchmics.clip_grad_norm_(model, -1.0))
    replicated = torchmics.shard(ToyModel(), torchmics.init_mesh(partition_size=1),  # 2 replicas; torchmics' hop
                                 mixed_precision=torchmics.MixedPrecision(replica_reduce_dtype=torch.bfloat16))

    by_fsdp2 = torchmics.shard(ToyModel(), torchmics.init_mesh(partition_size=1))  # 2 replicas; FSDP2's hop

    def clip_unreduced(sharded):
        with torchmics.no_replica_sync(sharded):
            sharded(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
        torchmics.clip_grad_norm_(sharded, 1.0)  # every backward of the step was deferred

    for name, sharded in (("clip_unreduced", replicated), ("clip_unreduced_fsdp2_hop", by_fsdp2)):
        attempt(name, lambda: clip_unreduced(sharded))
        sharded(torch.zeros(2, 3, dtype=torch.long)).sum().backward()  # outside: reduces what was deferred
        torchmics.clip_grad_norm_(sharded, 1.0)
    attempt("seed_not_int", lambda: torchmics.shard(ToyModel(), topo, init_seed="7"))
    attempt("reshard_not_bool", lambda: torchmics.shard(ToyModel(), topo, reshard_after_forward=None))
    built = torch.optim.AdamW(model.parameters())
    attempt("optimizer_instance", lambda: torchmics.ReplicaShardedOptimizer(model, built))
    attempt("adafactor", lambda: torchmics.ReplicaShardedOptimizer(model, torch.optim.Adafactor))
    model(torch.zeros(2, 3, dtype=torch.long)).sum().backward()  # still usable after every misuse
    return errors


def test_misuse_in_a_live_job_raises_everywhere_and_leaves_model_usable():
    results = run_ranks(_misuse_on_every_rank, 2)
    assert results[0] == results[1]
    errors = results[0]
    assert "Valid sizes: [1, 2]" in errors["bad_partition"]
    assert "already sharded" in errors["shard_twice"]
    assert "hierarchical=True" in errors["forced_hierarchy"]
    assert "tied weights" in errors["tied_unit"]
    assert "tuple of nn.Module classes" in errors["wrap_not_classes"]
    assert "do not nest" in errors["nested_no_sync"]
    assert "Valid sizes: [1, 2]" in errors["zero_partition"] and "partition_size=0" in errors["zero_partition"]
    assert "must be >= 1" in errors["zero_gpus_per_node"]
    assert "matches no sub-module of ToyModel" in errors["wrap_absent"] and "ToyBlock" in errors["wrap_absent"]
    assert "meta_init()" in errors["meta_buffers"] and errors["meta_buffers_again"] == errors["meta_buffers"]
    assert "inside no_replica_sync" in errors["clip_in_no_sync"]
    assert "must be > 0" in errors["clip_negative"]
    for name in ("clip_unreduced", "clip_unreduced_fsdp2_hop"):
        assert "gradients were never reduced across replicas: every backward since the last step ran" in errors[name]
    assert "init_seed='7'" in errors["seed_not_int"]
    assert "reshard_after_forward=None" in errors["reshard_not_bool"]
    assert "not an optimizer already built" in errors["optimizer_instance"]
    assert "cannot run Adafactor: it steps flat slices" in errors["adafactor"]
    assert errors["topology_not_a_topology"].startswith("TypeError: shard(model, topology): topology is a torchmics.")


def test_mixed_precision_refuses_dtypes_it_cannot_compute_in():
    bad_kinds = ({"param_dtype": torch.int8}, {"param_dtype": torch.float8_e4m3fn}, {"reduce_dtype": "bf16"},
                 {"replica_reduce_dtype": torch.int8})
    for bad in bad_kinds:
        with pytest.raises(ValueError, match="floating-point torch.dtype"):
            torchmics.MixedPrecision(**bad)
    torchmics.MixedPrecision(torch.bfloat16, torch.float32, torchmics.Quantized())  # the valid kinds pass
