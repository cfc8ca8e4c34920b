"""The DeepSpeed peers of `torchmics bench` (docs/design.md §7): their config, and training equal to plain training.

The training tests need DeepSpeed 0.18 and skip without it. On CPU they run on gloo, which cannot
coalesce collectives, so there MiCS' all-gathers run one tensor at a time; everything else (its
partition and replication groups, hierarchical gather, accumulation boundary, replica all-reduce)
is DeepSpeed's own code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from toy import reference_training
from torchmics.bench.deepspeed_peer import DEEPSPEED_SYSTEMS, DEEPSPEED_UNAVAILABLE, ds_config
from torchmics.bench.spec import LEARNING_RATE, BenchSpec
from torchmics.models import GPT, GPTConfig, causal_lm_loss, logits_of

# Matrices above DeepSpeed's 1e5-element persistence threshold, so they really are partitioned.
CFG = GPTConfig(n_layer=2, n_head=4, d_model=256, seq_len=16, vocab_size=512)
WORLD, NODES, STEPS, ACCUM = 4, 2, 2, 2


def spec(partition: int, gpus_per_node: int, reduce=torch.bfloat16, param=torch.bfloat16) -> BenchSpec:
    return BenchSpec("deepspeed", partition, gpus_per_node, reduce, param)


def test_zero3_config_has_no_mics():
    zero = ds_config(spec(4, 2), unit_numel=1000)["zero_optimization"]
    assert zero["stage"] == 3 and "mics_shard_size" not in zero
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 1000


@pytest.mark.parametrize("reduce, param, comm, accum", [
    (torch.bfloat16, torch.bfloat16, "bf16", "bf16"),
    (torch.float32, torch.bfloat16, "fp32", "fp32"),  # MiCS' replica all-reduce runs in the accumulation dtype
    (torch.bfloat16, torch.float32, "bf16", "fp32"),
])
def test_reduce_dtype_sets_every_gradient_collective(reduce, param, comm, accum):
    config = ds_config(spec(2, 2, reduce, param), unit_numel=1, mics_shard_size=2)
    assert config["bf16"]["enabled"] == (param == torch.bfloat16)
    assert (config["communication_data_type"], config["data_types"]["grad_accum_dtype"]) == (comm, accum)


def _all_gather_one_by_one(outputs: list[torch.Tensor], inputs: list[torch.Tensor], group=None, async_op=False):
    """MiCS' coalesced all-gather as one collective per tensor: gloo has no coalescing manager."""
    for output, shard in zip(outputs, inputs):
        dist.all_gather_into_tensor(output, shard, group=group)
    return SimpleNamespace(wait=lambda: None)  # the handle MiCS waits on: already done


def _train(system: str, partition: int, batches: torch.Tensor) -> dict:
    """Runs on every rank: the runner's loop (sync, backward, optimizer) over one DeepSpeed peer."""
    import deepspeed

    from torchmics.topology import ensure_process_group

    ensure_process_group()
    if dist.get_backend() == "gloo":
        deepspeed.comm.all_gather_coalesced = _all_gather_one_by_one
    torch.manual_seed(0)
    model = GPT(CFG)
    prepared = DEEPSPEED_SYSTEMS[system](spec(partition, WORLD // NODES, torch.float32, torch.float32), model)
    rank = dist.get_rank()
    for step_batches in batches:
        for i, micro in enumerate(step_batches):
            tokens = micro.chunk(WORLD)[rank].to(prepared.model.device)
            with prepared.sync(i == len(step_batches) - 1):
                loss = causal_lm_loss(logits_of(prepared.model, tokens[:, :-1]), tokens[:, 1:]) / len(step_batches)
                prepared.backward(loss)
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)
    groups = next(model.parameters()).comm if system.startswith("deepspeed-mics") else None
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"state": state, "hierarchical": groups is not None and groups.param_inter_node_shard_group is not None}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("system, partition, hierarchical", [
    ("deepspeed-zero3", WORLD, False),
    ("deepspeed-mics", WORLD, True),  # spans both nodes of 2 GPUs: the two-step gather
    ("deepspeed-mics-flat", WORLD, False),
    ("deepspeed-mics", WORLD // NODES, False),  # a node each (nothing to split), replicated across nodes
])
def test_training_equals_single_process(system, partition, hierarchical):
    if not DEEPSPEED_SYSTEMS:
        pytest.skip(DEEPSPEED_UNAVAILABLE)
    shape = (STEPS, ACCUM, 2 * WORLD, CFG.seq_len + 1)
    batches = torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    _, expected = reference_training(lambda: GPT(CFG), batches, lr=LEARNING_RATE, clip=None)
    # AdamW moves every weight by about the learning rate per step, whatever the gradient's scale; a
    # wrong accumulation (a micro-batch lost or counted twice) moves them by as much again.
    for result in run_ranks(_train, WORLD, system, partition, batches, nodes=NODES, timeout_s=600):
        assert result["hierarchical"] == hierarchical
        assert result["state"].keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=0, atol=LEARNING_RATE / 10, msg=name)
