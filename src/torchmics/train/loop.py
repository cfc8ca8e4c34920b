"""The training loop every rank runs: build, shard, then step with two-hop gradient accumulation.

Read it top to bottom: `train` sets the job up and loops over optimizer steps; `train_step` is one
step of ``accum`` micro-steps, all but the last inside `no_replica_sync` so the replication
all-reduce runs once per step (MiCS's two-hop synchronization).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import torchmics
from torchmics import checkpoint
from torchmics.models import build_model, causal_lm_loss, logits_of
from torchmics.models.gpt import GPT
from torchmics.sharding import DTYPES
from torchmics.topology import device_type
from torchmics.train.config import TrainConfig
from torchmics.train.data import BatchSampler, load_tokens
from torchmics.train.report import Reporter, peak_memory_bytes
from torchmics.train.resolve import job_sizes, resolve_partition_size
from torchmics.wrapping import compile_units


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Activation checkpointing and compilation go on per block, before sharding (as torchtitan does)."""
    if cfg.activation_checkpointing:
        if isinstance(model, GPT):
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            model.blocks = nn.ModuleList(checkpoint_wrapper(block) for block in model.blocks)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_units(model)
    return model


def train_step(model: nn.Module, sampler: BatchSampler, step: int, accum: int, device: torch.device) -> torch.Tensor:
    """Forward and backward over ``accum`` micro-batches; returns this rank's mean loss (a tensor)."""
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = (t.to(device, non_blocking=True) for t in sampler.batch(step, micro))
        last = micro == accum - 1
        with contextlib.nullcontext() if last else torchmics.no_replica_sync(model):
            loss = causal_lm_loss(logits_of(model, x), y) / accum
            loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, sampler: BatchSampler, batches: int, device: torch.device) -> float:
    """Mean validation loss over ``batches`` fixed batches, averaged over all ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(batches):
        x, y = (t.to(device) for t in sampler.batch(0, i))
        total += causal_lm_loss(logits_of(model, x), y)
    model.train()
    dist.all_reduce(total)
    return total.item() / (batches * dist.get_world_size())


def _mixed_precision(cfg: TrainConfig) -> torchmics.MixedPrecision:
    """bf16 compute reduces in fp32 inside the partition group; the replica hop may pick its own dtype."""
    compute = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    reduce = torch.float32 if compute is not None else None
    return torchmics.MixedPrecision(compute, reduce, DTYPES.get(cfg.replica_reduce_dtype))


def _optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device):
    options = dict(lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    if cfg.optimizer_over_replicas:
        return torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, **options)
    return torch.optim.AdamW(model.parameters(), **options)


def train(cfg: TrainConfig) -> dict:
    """One rank's whole run; returns the summary on rank 0 (which keeps the metrics) and {} elsewhere."""
    torch.manual_seed(cfg.seed)
    model, info = build_model(cfg.model, cfg.seq_len)
    world, gpus_per_node = job_sizes(cfg)
    partition_size = resolve_partition_size(cfg, info, world, gpus_per_node)
    topo = torchmics.init_mesh(partition_size=partition_size, gpus_per_node=gpus_per_node)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_type(), torch.cuda.current_device() if device_type() == "cuda" else None)
    data = load_tokens(cfg.data, info.seq_len)
    model = torchmics.shard(prepare_model(model, cfg), topo, mixed_precision=_mixed_precision(cfg),
                            shard_optimizer_across_replicas=cfg.optimizer_over_replicas)
    optimizer = _optimizer(cfg, model, device)
    sampler = BatchSampler(data.train, info.seq_len, cfg.micro_batch * world, rank, world, cfg.seed)
    val_sampler = BatchSampler(data.val, info.seq_len, cfg.micro_batch * world, rank, world, cfg.seed + 1)
    resumed_from = _resume_path(cfg)
    start = 0 if resumed_from is None else int(checkpoint.load_checkpoint(resumed_from, model, optimizer)["step"])
    reporter = Reporter(cfg, topo, info, data.source, model, enabled=rank == 0, start=start, resumed_from=resumed_from)
    tokens_per_step = cfg.micro_batch * world * cfg.accum * info.seq_len
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        began = time.perf_counter()
        loss = train_step(model, sampler, step, cfg.accum, device)
        grad_norm = torchmics.clip_grad_norm_(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss)
        elapsed = time.perf_counter() - began
        record = {
            "step": step + 1,
            "loss": loss.item() / world,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_step / elapsed,
            "step_time_s": elapsed,
            "peak_mem_bytes": peak_memory_bytes(device),
        }
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val_loss"] = evaluate(model, val_sampler, cfg.eval_batches, device)
        reporter.log(record)
        if _saves_at(cfg, step + 1):
            _save(cfg, model, optimizer, step + 1)
    return reporter.finish()


def _resume_path(cfg: TrainConfig) -> str | None:
    """The checkpoint ``--resume`` names (``auto``: the newest complete one in ``--out``), or None.

    Rank 0 looks and tells the others: ranks on several nodes could otherwise see a shared file system
    at slightly different moments and resume from different steps.
    """
    choice: list[str | None] = [None]
    if dist.get_rank() == 0 and cfg.resume is not None:
        choice[0] = checkpoint.latest_checkpoint(cfg.out) if cfg.resume == "auto" else cfg.resume
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _saves_at(cfg: TrainConfig, step: int) -> bool:
    """Whether to save after ``step``: every ``checkpoint_every`` steps, and after the last one too.

    The final save happens whenever the run checkpoints or resumes, so that export gets the final
    weights and `--resume auto` after a finished run has nothing to redo.
    """
    checkpointing = cfg.checkpoint_every > 0 or cfg.resume is not None
    periodic = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
    return periodic or (checkpointing and step == cfg.steps)


def _save(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """The data position is the step (see train/data.py), so step and model spec are all we add."""
    path = checkpoint.checkpoint_path(cfg.out, step)
    checkpoint.save_checkpoint(path, model, optimizer, step=step, extra={"model": cfg.model})
