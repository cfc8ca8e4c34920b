"""The single-rank reduce-scatter's aliased buffer under a slow reduce-scatter stream (CUDA only).

``torchmics._fsdp._AliasedReduceScatter`` hands FSDP2 the reduce-scatter input back as its output. The
input is allocated on the compute stream, the output is read on the reduce-scatter stream after FSDP2
has released the input, so unless the buffer is recorded on that stream the next unit's input can be
given the same memory while the cast of this unit's output still reads it. This makes the
reduce-scatter stream lag (a ``torch.cuda._sleep`` before FSDP2's divide on it) and compares every
gradient of eight units, bf16 compute with fp32 parameters (so FSDP2 casts the output), with plain
FSDP2's on the same one-rank mesh. Usage: python benchmarks/single_rank_race.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed.fsdp._fully_shard._fsdp_collectives as fsdp_collectives
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import torchmics

LAG_CYCLES = 20_000_000  # about 10 ms on an H200: far longer than the next unit's backward


class Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1024, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = nn.ModuleList(Unit() for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


def _gradients(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    return [p.grad.full_tensor() for p in model.parameters()]


def main() -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29535"}.items():
        os.environ.setdefault(key, value)
    torch.cuda.set_device(0)
    topo = torchmics.init_mesh(partition_size=1, gpus_per_node=1)
    divide = fsdp_collectives._div_if_needed
    torch.manual_seed(0)
    weights = Stack().state_dict()
    x = torch.randn(64, 1024, device="cuda")
    for lag in (0, LAG_CYCLES):
        def lagging(tensor: torch.Tensor, factor) -> None:
            torch.cuda._sleep(lag)  # on the reduce-scatter stream, where FSDP2 calls it
            divide(tensor, factor)

        fsdp_collectives._div_if_needed = lagging
        runs = []
        for system in ("fsdp2", "torchmics"):
            model = Stack().cuda()
            model.load_state_dict(weights)
            if system == "torchmics":
                model = torchmics.shard(model, topo, wrap=(Unit,),
                                        mixed_precision=torchmics.MixedPrecision(param_dtype=torch.bfloat16))
            else:
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
                for unit in [*model.units, model]:
                    fully_shard(unit, mesh=topo.mesh["shard"], mp_policy=policy)
            runs.append(_gradients(model, x))
        differ = [i for i, (a, b) in enumerate(zip(*runs)) if not torch.equal(a, b)]
        print(f"reduce-scatter stream lag {lag:>10} cycles: {len(differ)} of {len(runs[0])} gradients differ from "
              f"FSDP2's {differ}", flush=True)
    fsdp_collectives._div_if_needed = divide
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
