"""Rank arithmetic, checked against brute-force definitions on large worlds (no processes), and init_mesh's defaults."""

import itertools
import os
import warnings

import pytest
import torch.distributed as dist

from dist_utils import run_ranks
from torchmics.topology import init_mesh, plan_topology, valid_partition_sizes


def _same_group(groups, a, b) -> bool:
    return any(a in g and b in g for g in groups)


@pytest.mark.parametrize("world,gpus,partition", [(1024, 8, 16), (64, 8, 4), (32, 4, 32), (16, 1, 4)])
def test_groups_follow_their_definitions(world, gpus, partition):
    topo = plan_topology(world, gpus, partition)
    for groups in (topo.partition_groups, topo.replication_groups):
        assert sorted(itertools.chain(*groups)) == list(range(world))  # every rank exactly once
    sample = range(0, world, max(1, world // 48))
    for a, b in itertools.product(sample, sample):
        assert _same_group(topo.partition_groups, a, b) == (a // partition == b // partition)
        assert _same_group(topo.replication_groups, a, b) == (a % partition == b % partition)
        if topo.hierarchical:
            same_partition, same_node = a // partition == b // partition, a // gpus == b // gpus
            assert _same_group(topo.inter_groups, a, b) == (same_partition and a % gpus == b % gpus)
            assert _same_group(topo.intra_groups, a, b) == same_node


def test_large_world_shapes():
    topo = plan_topology(1024, 8, 16)
    assert topo.hierarchical and topo.num_nodes == 128 and topo.num_replicas == 64
    assert len(topo.partition_groups) == 64 and {len(g) for g in topo.partition_groups} == {16}
    assert len(topo.replication_groups) == 16 and {len(g) for g in topo.replication_groups} == {64}
    assert len(topo.inter_groups) == 64 * 8 and {len(g) for g in topo.inter_groups} == {2}
    assert len(topo.intra_groups) == 128 and {len(g) for g in topo.intra_groups} == {8}
    assert topo.partition_index(37) == 2 and topo.shard_index(37) == 5


@pytest.mark.parametrize("world,gpus,partition", [(8, 8, 4), (8, 2, 2), (16, 1, 16), (8, 4, 8)])
def test_hierarchy_only_when_spanning_multi_gpu_nodes(world, gpus, partition):
    topo = plan_topology(world, gpus, partition)
    assert topo.hierarchical == (partition > gpus > 1)
    assert (topo.inter_groups == ()) == (not topo.hierarchical)


def test_valid_partition_sizes_are_node_aligned_divisors():
    assert valid_partition_sizes(32, 8) == [1, 2, 4, 8, 16, 32]
    assert valid_partition_sizes(24, 4) == [1, 2, 4, 8, 12, 24]
    assert valid_partition_sizes(12, 4) == [1, 2, 4, 12]


@pytest.mark.parametrize(
    "world,gpus,partition,words",
    [
        (4, 4, 3, ["partition_size=3", "Valid sizes: [1, 2, 4]"]),
        (12, 4, 6, ["node-aligned", "Valid sizes: [1, 2, 4, 12]"]),
        (6, 4, 2, ["gpus_per_node=4", "whole nodes", "[1, 2, 3, 6]"]),
        (4, 0, 1, ["must be >= 1"]),
    ],
)
def test_bad_sizes_explain_what_is_valid(world, gpus, partition, words):
    with pytest.raises(ValueError) as err:
        plan_topology(world, gpus, partition)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("sizes", [(4, 2, 2.0), (4, "2", 2), (4.0, 2, 2)])
def test_sizes_that_are_not_ints_are_refused_by_name(sizes):
    with pytest.raises(TypeError, match="must be an int"):
        plan_topology(*sizes)


def _init_mesh_warnings() -> dict:
    """init_mesh without gpus_per_node on CPU ranks, first without LOCAL_WORLD_SIZE, then told either way."""
    local_world_size = os.environ.pop("LOCAL_WORLD_SIZE")
    with warnings.catch_warnings(record=True) as assumed:
        warnings.simplefilter("always")
        topo = init_mesh(partition_size=4)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        init_mesh(partition_size=4, gpus_per_node=2)
        os.environ["LOCAL_WORLD_SIZE"] = local_world_size
        init_mesh(partition_size=4)
    return {"rank": dist.get_rank(), "assumed": [str(w.message) for w in assumed], "told": len(told),
            "gpus_per_node": topo.gpus_per_node}


def test_init_mesh_says_when_it_assumes_one_node():
    results = run_ranks(_init_mesh_warnings, 4, nodes=2)
    assert [r["gpus_per_node"] for r in results] == [4] * 4  # the assumption: one node, a flat partition
    (message,) = results[0]["assumed"]
    assert "assumed to be on one node" in message and "gpus_per_node=N" in message and "LOCAL_WORLD_SIZE" in message
    assert all(not r["assumed"] for r in results[1:])  # rank 0 only
    assert all(r["told"] == 0 for r in results)
