"""`torchmics train`: check the configuration, then run here (torchrun) or spawn local ranks."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.multiprocessing import ProcessRaisedException

from torchmics import checkpoint, fault_tolerance
from torchmics.models import build_model
from torchmics.train import run_folder
from torchmics.train.build import check_pretrained
from torchmics.train.config import TrainConfig, build_parser, resolve_config
from torchmics.train.data import check_model_fits, load_tokens
from torchmics.launch import (
    LocalLaunch,
    WorkerFailed,
    restart_hazard,
    run_rank,
    show_warnings_as_lines,
    spawn,
    under_torchrun,
)
from torchmics.train.report import LAUNCHED_AT_ENV
from torchmics.train.resolve import job_sizes, local_launch_shape, resolve_partition_size
from torchmics.train.tracking import check_trackers


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model with MiCS (CPU: 4 processes as 2 emulated nodes; GPUs: all local GPUs)",
        description="Train a GPT preset or a transformers causal LM with MiCS sharding. Without flags: "
        "the `small` GPT on the Python standard library's source, 4 CPU processes as 2 nodes x 2.",
    )
    build_parser(parser)
    parser.set_defaults(run=run)


def preflight(cfg: TrainConfig, *, check_results: bool = True) -> LocalLaunch | None:
    """Every check that needs no process group, so bad input fails here and not inside N workers.

    That includes the checkpoint a resume will start from: its files are there at their saved sizes,
    and it fits the model and the optimizer (checksums are compared by the workers, which share the
    reading). ``check_results``: refuse an ``--out`` holding another run's metrics (the job that holds
    the run folder checks; see run_folder.py; a ``--fault-tolerant`` group restarted into its own folder
    continues it: it rejoins the job's step). Resolves ``--partition-size auto`` into ``cfg``.
    Returns how to spawn local ranks, or None when torchrun already started them (then each rank
    runs this same check on its own).
    """
    with torch.device("meta"):
        model, info = build_model(cfg.model, cfg.seq_len)
    # The checksum is read once per node: in the launcher, or in local rank 0 under torchrun.
    data = load_tokens(cfg.data, info.seq_len, verify=os.environ.get("LOCAL_RANK", "0") == "0")
    check_model_fits(data, cfg.model, info.vocab_size)
    if os.environ.get("RANK", "0") == "0":  # the rank that writes the trackers (the launcher: every rank's)
        check_trackers(cfg)
    check_pretrained(cfg, model)
    resume_from = _resume_candidate(cfg)
    if resume_from is not None:
        _check_resume_fits(cfg, resume_from, model)
    if check_results and not cfg.fault_tolerant:
        run_folder.refuse_to_replace_results(cfg.out, resume_from)
    if under_torchrun():
        _warn_of_restart_hazard()
        launch, (world, gpus_per_node) = None, job_sizes(cfg)
    else:
        nproc, nodes = local_launch_shape(cfg)
        launch = LocalLaunch(nproc, nodes, use_gpus=torch.cuda.is_available())
        world, gpus_per_node = nproc, cfg.gpus_per_node or launch.procs_per_node
    cfg.partition_size = str(resolve_partition_size(cfg, info, world, gpus_per_node))
    if cfg.fault_tolerant:  # before spawning: a missing lighthouse would otherwise surface as a quorum timeout
        fault_tolerance.require_torchft()
        fault_tolerance.check_reachable(fault_tolerance.lighthouse_address(cfg.lighthouse))
    return launch


def _warn_of_restart_hazard() -> None:
    """Once per job (rank 0): a failed restart is found only when a worker dies, long after the start."""
    hazard = restart_hazard()
    if hazard is not None and os.environ["RANK"] == "0":
        print(f"torchmics train: warning: {hazard}", file=sys.stderr)


def _resume_candidate(cfg: TrainConfig) -> str | None:
    """The checkpoint the run will resume from, as far as file sizes tell; refuses what cannot work.

    A fresh run over another run's checkpoints would fail at its first save (checkpoints are never
    overwritten) after wasting its steps; saying so now also names the flag probably forgotten.
    ``--resume auto`` passes over damaged checkpoints here quietly: the workers say which they skip.
    """
    if cfg.resume is None:
        existing = checkpoint.complete_checkpoints(cfg.out)
        if existing:
            raise ValueError(
                f"--out {cfg.out} already holds checkpoints of a run (newest: {existing[0]}); "
                "pass --resume auto to continue it, or choose another --out"
            )
        return None
    if cfg.resume == "auto":
        candidates = checkpoint.complete_checkpoints(cfg.out)
        damage = {path: checkpoint.size_damage(path) for path in candidates}
        usable = [path for path in candidates if not damage[path]]
        if candidates and not usable:
            named = "; ".join(f"{os.path.basename(path)}: {', '.join(problems)}" for path, problems in damage.items())
            raise ValueError(f"--resume auto: every checkpoint in --out {cfg.out} is damaged ({named}); "
                             "restore one from a copy, or choose another --out for a fresh run")
        return usable[0] if usable else None
    try:
        checkpoint.read_metadata(cfg.resume)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--resume: {err} (or --resume auto for the newest one in --out)") from err
    damage = checkpoint.size_damage(cfg.resume)
    if damage:
        raise ValueError(
            f"--resume {cfg.resume} is damaged: {'; '.join(damage)}; pass an earlier checkpoint of the run, "
            "or --resume auto (it skips damaged checkpoints)"
        )
    return cfg.resume


def _check_resume_fits(cfg: TrainConfig, path: str, model: nn.Module) -> None:
    """The checkpoint's recorded shapes and optimizer state names must be this run's (a meta model suffices)."""
    saved = checkpoint.read_metadata(path)
    problems = checkpoint.shape_differences(saved["shapes"], {k: list(v.shape) for k, v in model.state_dict().items()})
    if problems:
        saved_model = saved["extra"].get("model")
        fix = f"pass --model {saved_model}" if saved_model not in (None, cfg.model) else "pass the --model it was saved with"
        more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise ValueError(
            f"the checkpoint to resume from, {path}, does not fit --model {cfg.model} ({'; '.join(problems[:2])}{more}); {fix}"
        )
    found = set().union(*checkpoint.saved_optimizer_state(path).values())
    needed = _adamw_state_names()
    if not needed <= found:
        raise ValueError(
            f"the checkpoint to resume from, {path}, holds the state of another optimizer ({', '.join(sorted(found)) or 'none'}), but "
            f"torchmics train uses AdamW ({', '.join(sorted(needed))}); resume from a checkpoint of a torchmics train run"
        )


def _adamw_state_names() -> set[str]:
    """What AdamW keeps per parameter: the state of train's optimizer (plain or sharded over replicas)."""
    parameter = nn.Parameter(torch.zeros(1))
    parameter.grad = torch.zeros(1)
    optimizer = torch.optim.AdamW([parameter])
    optimizer.step()
    return set(optimizer.state[parameter])


def _train_rank(cfg: TrainConfig, debug: bool) -> None:
    """One rank's run; a failure's full traceback goes to the run folder before it propagates."""
    from torchmics.train.loop import train

    show_warnings_as_lines("torchmics train", debug)
    try:
        train(cfg)
    except Exception:
        with contextlib.suppress(OSError):  # an unwritable --out must not hide the error itself
            run_folder.error_log(cfg.out, int(os.environ["RANK"])).write_text(traceback.format_exc())
        raise


def _leads_the_job() -> bool:
    """The process that holds the run folder: the launcher, or rank 0 under torchrun."""
    return not under_torchrun() or os.environ["RANK"] == "0"


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    os.environ.setdefault(LAUNCHED_AT_ENV, str(time.time()))  # the workers report their time to first step
    leads = _leads_the_job()
    with run_folder.hold(cfg.out) if leads else contextlib.nullcontext(False) as continues_own_attempt:
        if leads:
            _remove_interrupted_saves(cfg.out)
        launch = preflight(cfg, check_results=leads and not continues_own_attempt)
        try:
            if launch is None:
                run_rank(_train_rank, cfg, args.debug)
            else:
                logs = None if args.debug else functools.partial(run_folder.native_log, cfg.out)
                spawn(_train_rank, launch, cfg, args.debug, native_logs=logs)
        except ProcessRaisedException as err:
            raise WorkerFailed(err.error_index, err.msg, _written(run_folder.error_log(cfg.out, err.error_index))) from None
        except Exception as err:  # under torchrun: this process is the rank
            if launch is not None:
                raise
            rank = int(os.environ["RANK"])
            raise WorkerFailed(rank, traceback.format_exc(), _written(run_folder.error_log(cfg.out, rank))) from err


def _written(log: Path) -> Path | None:
    return log if log.is_file() else None


def _remove_interrupted_saves(out: str) -> None:
    removed = checkpoint.remove_interrupted_saves(out)
    if removed:
        warnings.warn(f"removed what interrupted saves left in {out}: {', '.join(removed)}", stacklevel=2)
