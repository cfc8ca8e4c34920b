"""Meta-device init: every rank materializes only its shards, and the full weights do not depend on the cut.

The reference is a model built whole on the CPU in one process (its constructor, or
``torchmics.init_weights`` for models whose constructor initializes otherwise).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchmics
from dist_utils import run_ranks
from test_equivalence import build_gpt2, build_llama
from torchmics.models import GPT, get_preset

SEED = 1234
GPT_CFG = get_preset("tiny")
BUILDERS = {"gpt": lambda: GPT(GPT_CFG), "llama": build_llama, "gpt2": build_gpt2}


def _reference(builder: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    model = BUILDERS[builder]()
    if builder != "gpt":  # HF constructors initialize from one stream; torchmics' rule is per module
        torchmics.init_weights(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _materialized(builder: str, partition_size: int, gpus_per_node: int, checkpointing: bool = False) -> dict:
    topo = torchmics.init_mesh(partition_size=partition_size, gpus_per_node=gpus_per_node)
    torch.manual_seed(SEED)
    with torchmics.meta_init():
        model = BUILDERS[builder]()
    assert all(p.is_meta for p in model.parameters())
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.blocks = nn.ModuleList(checkpoint_wrapper(b) for b in model.blocks)
    model = torchmics.shard(model, topo)
    local = sum(p.to_local().numel() for p in model.parameters())
    return {"state": torchmics.full_state_dict(model), "local_numel": local}


def _cuts(cases: list[tuple[str, int, int, bool]]) -> list[dict]:
    """Several models and topologies in one job (each ``init_mesh`` makes its own groups): one spawn, not one each."""
    return [_materialized(*case) for case in cases]


def _assert_same_weights(state: dict[str, torch.Tensor], builder: str) -> None:
    reference = _reference(builder)
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


FOUR_RANKS = [("gpt", 2, 2, False), ("gpt", 4, 2, False), ("llama", 4, 2, False), ("gpt2", 4, 2, False)]


def test_meta_init_equals_cpu_init_on_four_ranks():
    """World 4 as 2 nodes x 2: partition 2, and 4 (hierarchical) for our GPT and two transformers models."""
    results = run_ranks(_cuts, 4, FOUR_RANKS, nodes=2)[0]
    total = sum(p.numel() for p in GPT(GPT_CFG).parameters())
    for (builder, partition, _, _), result in zip(FOUR_RANKS, results):
        _assert_same_weights(result["state"], builder)
        if builder == "gpt":  # each rank holds a shard, not the model
            assert result["local_numel"] <= total // partition + 64 * GPT_CFG.d_model


def test_meta_init_equals_cpu_init_on_eight_ranks():
    """World 8 (4 nodes x 2, partition 4, hierarchical), with activation checkpointing wrappers."""
    _assert_same_weights(run_ranks(_cuts, 8, [("gpt", 4, 2, True)], nodes=4)[0][0]["state"], "gpt")


def test_hf_init_keeps_hf_semantics():
    """Deterministic parts equal transformers' own init; random parts have its standard deviation."""
    torch.manual_seed(0)
    hf = build_llama()
    ours = _reference("llama")
    for name, tensor in hf.state_dict().items():
        if "norm" in name or "inv_freq" in name:
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
        elif tensor.numel() > 200:
            assert abs(ours[name].std().item() - hf.config.initializer_range) < 0.004, name
    from transformers import GPT2Config

    std = GPT2Config().initializer_range / (2 * 2) ** 0.5  # GPT-2's c_proj scaling, 2 layers
    c_proj = _reference("gpt2")["transformer.h.0.mlp.c_proj.weight"]
    assert abs(c_proj.std().item() - std) < 0.003


def test_uninitialized_parameter_is_named():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="parameter scale .*not set by any initializer"):
        torchmics.init_weights(Bare())


class _ReachingGPT(GPT):
    """A root-level rule that rescales the blocks' projections, as nanoGPT does from its constructor."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            for block in self.blocks:
                block.mlp.proj.weight.mul_(0.5)


class _SharedBuffer(nn.Module):
    """Two modules registering one buffer: both must keep its values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        mask = torch.arange(3.0)
        self.a.register_buffer("mask", mask)
        self.b.register_buffer("mask", mask)


def _shard_error(build) -> str | None:
    topo = torchmics.init_mesh(partition_size=1, gpus_per_node=1)
    with torch.device("meta") if build is build_llama else torchmics.meta_init():
        model = build()
    try:
        torchmics.shard(model, topo)
    except ValueError as err:
        return str(err)
    return None


def _one_rank() -> dict:
    """World 1: the materialized GPT, shared buffers, and what shard() refuses."""
    topo = torchmics.init_mesh(partition_size=1, gpus_per_node=1)
    with torchmics.meta_init():
        shared = _SharedBuffer()
    shared = torchmics.shard(shared, topo)
    return {
        "gpt": _materialized("gpt", 1, 1),
        "masks": (shared.a.mask.clone(), shared.b.mask.clone()),
        "plain_meta": _shard_error(build_llama),
        "reaching": _shard_error(lambda: _ReachingGPT(GPT_CFG)),
    }


def test_one_rank_buffers_and_refusals():
    result = run_ranks(_one_rank, 1)[0]
    _assert_same_weights(result["gpt"]["state"], "gpt")
    for mask in result["masks"]:
        torch.testing.assert_close(mask, torch.arange(3.0))
    assert "torchmics.meta_init()" in result["plain_meta"] and "inv_freq" in result["plain_meta"]
    assert "wrote blocks.0.mlp.proj.weight" in result["reaching"] and "other units" in result["reaching"]
