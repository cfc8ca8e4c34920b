"""The training loop every rank runs: build, shard, then step with two-hop gradient accumulation.

Read it top to bottom: `train` sets the job up and loops over optimizer steps; `train_step` is one
step of ``accum`` micro-steps, all but the last inside `no_replica_sync` so the replication
all-reduce runs once per step (MiCS's two-hop synchronization).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import torchmics
from torchmics import checkpoint, fault_tolerance
from torchmics.models import causal_lm_loss, logits_of
from torchmics.models import schedules
from torchmics.topology import current_device
from torchmics.train.build import build_on_meta, fill_weights, shard_model
from torchmics.train.config import TrainConfig
from torchmics.train.data import BatchSampler, load_tokens
from torchmics.train.meter import NonFiniteGuard, StepMeter, TrainingDiverged
from torchmics.train.report import Reporter
from torchmics.train.resolve import job_sizes, resolve_partition_size, resolve_reshard_after_forward
from torchmics.train.run_folder import set_aside_newer


def _to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Copies from pinned memory, so that they queue behind the step's kernels instead of waiting for them."""
    if device.type != "cuda":
        return batch
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


def train_step(model: nn.Module, sampler: BatchSampler, step: int, accum: int, device: torch.device,
               fused_loss: bool = False) -> torch.Tensor:
    """Forward and backward over ``accum`` micro-batches; returns this rank's mean loss (a device tensor, unread)."""
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = _to_device(sampler.batch(step, micro), device)
        last = micro == accum - 1
        with contextlib.nullcontext() if last else torchmics.no_replica_sync(model):
            loss = causal_lm_loss(logits_of(model, x), y, fused=fused_loss) / accum
            loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, sampler: BatchSampler, batches: int, device: torch.device,
             fused_loss: bool = False) -> float:
    """Mean validation loss over ``batches`` fixed batches, averaged over all ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(batches):
        x, y = _to_device(sampler.batch(0, i), device)
        total += causal_lm_loss(logits_of(model, x), y, fused=fused_loss)
    model.train()
    dist.all_reduce(total)
    return total.item() / (batches * dist.get_world_size())


def _seconds_since(began: float, device: torch.device) -> float:
    """Wall time since ``began``, once the device has finished what was queued (initialization runs there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def _optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device):
    """AdamW, fused: on the GPU, or on the CPU where --cpu-offload keeps the shards (1.7x foreach there)."""
    fused = device.type == "cuda" or cfg.cpu_offload
    options = dict(lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer_over_replicas:
        return torchmics.ReplicaShardedOptimizer(model, torch.optim.AdamW, **options)
    return torch.optim.AdamW(model.parameters(), **options)


class _EveryStepCommits:
    """The loop's step counter without fault tolerance: every step commits."""

    def __init__(self, start: int) -> None:
        self.step = start

    def start_step(self) -> int:
        return self.step

    def should_commit(self) -> bool:
        self.step += 1
        return True

    def shutdown(self) -> None:
        pass


def _step_counter(cfg: TrainConfig, model: nn.Module, optimizer, start: int):
    """Who decides which step runs next and whether it commits: this job, or torchft's quorum of replica groups."""
    if not cfg.fault_tolerant:
        return _EveryStepCommits(start)
    # torchft logs every quorum change and a traceback per rank for a peer's failure; the loop says it in one line.
    logging.getLogger("torchft").setLevel(logging.CRITICAL)
    ft = fault_tolerance.FaultTolerantReplicas(model, optimizer, replica_group=cfg.replica_group,
                                               lighthouse=fault_tolerance.lighthouse_address(cfg.lighthouse))
    ft.resume_at(start)
    return ft


def _data_split(cfg: TrainConfig) -> tuple[int, int]:
    """(rank, world) of this process in the data: a replica group reads its own rows of the job's batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cfg.fault_tolerant:
        return rank, world
    return fault_tolerance.data_rank(cfg.replica_group, cfg.replica_groups, rank, world)


def train(cfg: TrainConfig) -> dict:
    """One rank's whole run; returns the summary on rank 0 (which keeps the metrics) and {} elsewhere."""
    began = time.perf_counter()
    model, info = build_on_meta(cfg)
    world, gpus_per_node = job_sizes(cfg)
    partition_size = resolve_partition_size(cfg, info, world, gpus_per_node)
    topo = torchmics.init_mesh(partition_size=partition_size, gpus_per_node=gpus_per_node)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = current_device()
    data = load_tokens(cfg.data, info.seq_len)
    model = shard_model(model, cfg, topo, resolve_reshard_after_forward(cfg, info, world, gpus_per_node, partition_size))
    optimizer = _optimizer(cfg, model, device)
    data_rank, data_world = _data_split(cfg)
    sampler = BatchSampler(data.train, info.seq_len, cfg.micro_batch * data_world, data_rank, data_world, cfg.seed)
    val_sampler = BatchSampler(data.val, info.seq_len, cfg.micro_batch * data_world, data_rank, data_world, cfg.seed + 1)
    resumed_from = _resume_path(cfg)
    if resumed_from is None:
        start, weights = 0, fill_weights(model, cfg)
    else:
        start = int(checkpoint.load_checkpoint(resumed_from, model, optimizer)["step"])
        weights = f"from the checkpoint {resumed_from}"
    steps = _step_counter(cfg, model, optimizer, start)
    start = steps.start_step()  # a replica group rejoining a fault-tolerant job is healed here, and skips ahead
    reporter = Reporter(cfg, topo, info, data.source, model, enabled=rank == 0, start=start, resumed_from=resumed_from)
    reporter.show_startup(weights, _seconds_since(began, device))
    tokens_per_step = cfg.micro_batch * world * cfg.accum * info.seq_len
    schedule = schedules.schedule(cfg.model, cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps, tokens_per_step)
    reporter.show_schedule(schedule, tokens_per_step)
    meter, guard = StepMeter(device, tokens_per_step, info.flops_per_token), NonFiniteGuard(cfg.max_skipped_steps)
    meter.restart()
    while (step := steps.start_step()) < cfg.steps:
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, sampler, step, cfg.accum, device, fused_loss=cfg.compile)
        grad_norm = torchmics.clip_grad_norm_(model, cfg.grad_clip)
        if not steps.should_commit():  # a replica group failed during the step: redo it with the new quorum
            optimizer.zero_grad(set_to_none=True)
            if rank == 0:
                warnings.warn(f"step {step + 1} did not commit (a replica group failed during it); it is redone "
                              "with the groups still alive", stacklevel=1)
            continue
        skipped = guard.skips(grad_norm)
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        meter.add(done, lr, loss, grad_norm, skipped)
        evaluates = done % cfg.eval_every == 0 or done == cfg.steps
        saves = _saves_at(cfg, done)
        if not (done % cfg.log_every == 0 or evaluates or saves or guard.exhausted):
            continue
        records = meter.read()  # the interval ends before every evaluation and checkpoint
        problem = guard.problem(records)
        if evaluates and problem is None:
            records[-1]["val_loss"] = evaluate(model, val_sampler, cfg.eval_batches, device, fused_loss=cfg.compile)
        reporter.log(records)
        if problem is not None:
            reporter.stop(problem)
            dist.barrier()  # every rank saw the same values; rank 0 closes its outputs before anyone exits
            raise TrainingDiverged(problem)
        if saves:
            _save(cfg, model, optimizer, done, resumed_from)
        meter.restart()  # evaluation and checkpointing are not training time
    steps.shutdown()
    return reporter.finish()


def _resume_path(cfg: TrainConfig) -> str | None:
    """The checkpoint ``--resume`` names (``auto``: the newest in ``--out`` whose files verify), or None.

    Rank 0 lists the candidates and tells the others: ranks on several nodes could otherwise see a
    shared file system at slightly different moments and resume from different steps. All ranks
    verify each candidate together (sizes and checksums, each rank reading its share); ``auto`` skips
    a damaged one with a warning. Checkpoint folders of ``--out`` after the chosen step would clash
    with this run's saves, so rank 0 moves them aside (kept, not deleted).
    """
    if cfg.resume is None:
        return None
    explicit = cfg.resume != "auto"
    candidates = checkpoint.on_rank0(lambda: [cfg.resume] if explicit else checkpoint.complete_checkpoints(cfg.out))
    chosen = next((path for path in candidates if explicit or _verifies(path)), None)
    if explicit:
        checkpoint.verify_checkpoint(chosen)
    elif candidates and chosen is None:
        raise ValueError(f"--resume auto: no checkpoint in --out {cfg.out} verifies (see the warnings above); "
                         "restore one from a copy, or choose another --out for a fresh run")
    step = 0 if chosen is None else int(checkpoint.read_metadata(chosen)["step"])
    checkpoint.on_rank0(lambda: set_aside_newer(cfg.out, step))
    return chosen


def _verifies(path: str) -> bool:
    """Whether checkpoint ``path`` verifies (every rank calls it); rank 0 warns of a damaged one."""
    try:
        checkpoint.verify_checkpoint(path)
    except checkpoint.DamagedCheckpointError as err:
        if dist.get_rank() == 0:
            warnings.warn(f"--resume auto: skipping damaged checkpoint {err.path} ({'; '.join(err.problems)})", stacklevel=2)
        return False
    return True


def _saves_at(cfg: TrainConfig, step: int) -> bool:
    """Whether to save after ``step``: every ``checkpoint_every`` steps, and after the last one too.

    The final save happens whenever the run checkpoints or resumes, so that export gets the final
    weights and `--resume auto` after a finished run has nothing to redo.
    """
    checkpointing = cfg.checkpoint_every > 0 or cfg.resume is not None
    periodic = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
    return periodic or (checkpointing and step == cfg.steps)


def _save(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
          resumed_from: str | None) -> None:
    """The data position is the step (see train/data.py), so step and model spec are all we add.

    ``--keep-checkpoints`` prunes the oldest, never the checkpoint this run resumed from.
    """
    path = checkpoint.checkpoint_path(cfg.out, step)
    checkpoint.save_checkpoint(path, model, optimizer, step=step, extra={"model": cfg.model},
                               keep=cfg.keep_checkpoints, protect=[resumed_from] if resumed_from else [])
