"""The memory model's staging term equals the bytes the hierarchical collectives really keep."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist

import torchmics
from dist_utils import run_ranks
from torchmics import collectives
from torchmics.models import GPT, Block, get_preset
from torchmics.plan import ModelSpec, Strategy, estimate_memory

NODES, GPUS_PER_NODE, PARTITION = 2, 2, 4


def _staging_after_training(steps: int) -> list[dict[tuple, int]]:
    """Train the tiny GPT hierarchically; the bytes each collective's buffer cache holds after each step."""
    caches = []
    original = collectives._StagingBuffers.__init__

    def recording(self) -> None:
        original(self)
        caches.append(self)

    topo = torchmics.init_mesh(partition_size=PARTITION, gpus_per_node=GPUS_PER_NODE)
    torch.manual_seed(0)
    with mock.patch.object(collectives._StagingBuffers, "__init__", recording):
        model = torchmics.shard(GPT(get_preset("tiny")), topo, wrap=(Block,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    held = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        held.append({key: buffer.nbytes for cache in caches for key, buffer in cache._buffers.items()})
    return held


def test_staging_bytes_equal_what_the_collectives_hold():
    results = run_ranks(_staging_after_training, NODES * GPUS_PER_NODE, 2, nodes=NODES)
    spec = ModelSpec.from_preset("tiny")
    fp32 = Strategy.mics(PARTITION, param_bytes=4, reduce_bytes=4)  # no mixed precision on CPU
    predicted = estimate_memory(spec, fp32, NODES * GPUS_PER_NODE, GPUS_PER_NODE, micro_batch=2).staging
    for first, second in results:
        assert first == second  # reused, never grown: held for the life of the job
        roles = sorted(key[0] for key in first)
        assert roles == sorted(["ag_inter", "ag_intra", "rs_intra", "rs_inter"] * 2)  # two unit sizes: block, root
        # the spec attributes the final norm to the blocks, so its unit sizes are 0.05% off the real ones
        assert sum(first.values()) == pytest.approx(predicted, rel=1e-3)


def test_staging_counts_only_hierarchical_partitions():
    spec = ModelSpec.from_shape(n_layer=24, d_model=2048, n_head=16, seq_len=2048, vocab_size=50304)
    hierarchical = estimate_memory(spec, Strategy.mics(16), 32, 8, micro_batch=1)
    units = spec.layer_params + (spec.num_params - spec.n_layer * spec.layer_params)
    assert hierarchical.staging == pytest.approx((1 + 1 / 8) * units * (2 + 4))  # bf16 gathers, fp32 reductions
    assert hierarchical.total == pytest.approx(estimate_memory(spec, Strategy.mics(16, hierarchical=False), 32, 8,
                                                               micro_batch=1).total + hierarchical.staging)
    for strategy, gpus_per_node in ((Strategy.mics(8), 8), (Strategy.mics(16), 1), (Strategy.zero3(), 8)):
        assert estimate_memory(spec, strategy, 32, gpus_per_node, micro_batch=1).staging == 0.0
