"""A small model with every awkward feature, and plain single-process training as the reference."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import torchmics

VOCAB, WIDTH, SEQ = 37, 13, 6  # odd sizes: no parameter divides evenly into 2, 4 or 8 shards


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mix(self.norm(x)))


class ToyModel(nn.Module):
    """Tied embedding/head, a frozen parameter, a buffer, and a layer applied twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(3))
        self.shared = nn.Linear(WIDTH, WIDTH, bias=False)
        self.frozen_bias = nn.Parameter(torch.randn(WIDTH) * 0.1, requires_grad=False)
        self.register_buffer("position_scale", torch.linspace(0.5, 1.5, SEQ).unsqueeze(-1))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) * self.position_scale[: idx.shape[1]] + self.frozen_bias
        for block in self.active_blocks():
            x = block(x)
        x = self.shared(torch.relu(self.shared(x)))
        return self.head(x)


    def active_blocks(self) -> list[nn.Module]:
        return list(self.blocks)


class PartlyUsedToyModel(ToyModel):
    """Units that are not whole in every backward: each block holds a parameter that no forward uses,
    and the last block runs only on odd forward calls (with two micro-steps per step: only in the
    micro-step whose replica hop is deferred). Reference and sharded runs call forward alike."""

    def __init__(self) -> None:
        super().__init__()
        for block in self.blocks:
            block.unused = nn.Linear(WIDTH, WIDTH)
        self.calls = 0

    def active_blocks(self) -> list[nn.Module]:
        self.calls += 1
        return list(self.blocks) if self.calls % 2 else list(self.blocks)[:-1]


def make_batches(steps: int, accum: int, global_batch: int, seed: int = 0) -> torch.Tensor:
    """Token batches shaped [steps, accum, global_batch, SEQ + 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, accum, global_batch, SEQ + 1), generator=g)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    if hasattr(logits, "logits"):
        logits = logits.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def accumulate(model: nn.Module, step_batches: torch.Tensor) -> torch.Tensor:
    """This rank's share of one step's micro-batches, forward and backward, the replica hop deferred to the
    last micro-step (two-hop); returns the step's loss on this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.zeros(())
    for i, micro in enumerate(step_batches):
        with torchmics.no_replica_sync(model) if i < len(step_batches) - 1 else contextlib.nullcontext():
            loss = lm_loss(model, micro.chunk(world)[rank]) / len(step_batches)
            loss.backward()
        total += loss.detach()
    return total


def reference_training(build, batches: torch.Tensor, lr: float = 1e-2, clip: float | None = 1.0):
    """Single-process AdamW on the whole global batch: the ground truth for every sharded run."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step_batches in batches:
        step_loss = 0.0
        for micro in step_batches:
            loss = lm_loss(model, micro) / len(step_batches)
            loss.backward()
            step_loss += loss.item()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
