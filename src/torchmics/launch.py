"""Start one process per rank on this machine, optionally pretending to be several nodes.

Under ``torchrun`` (or Slurm via torchrun) nothing is spawned: the environment already names every
rank. On one machine we spawn the ranks ourselves with the same environment variables torchrun would
set, so the rest of torchmics has a single code path. ``emulate_nodes=N`` splits the local ranks into
N groups and gives each its own ``NCCL_HOSTID``: NCCL then routes traffic between groups over its
socket transport (loopback) instead of NVLink, which makes one host behave like a cloud cluster with
a slow inter-node network. On CPU (gloo) emulation only changes the topology torchmics is told.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class LocalLaunch:
    """How to lay ``nprocs`` local processes out as ``nodes`` emulated nodes."""

    nprocs: int
    nodes: int = 1
    use_gpus: bool = False

    def __post_init__(self) -> None:
        if self.nprocs < 1:
            raise ValueError(f"nprocs must be >= 1, got {self.nprocs}")
        if self.nodes < 1 or self.nprocs % self.nodes != 0:
            raise ValueError(
                f"cannot split {self.nprocs} processes into {self.nodes} emulated nodes: the node count "
                f"must divide the process count (try one of "
                f"{[n for n in range(1, self.nprocs + 1) if self.nprocs % n == 0]})."
            )

    @property
    def procs_per_node(self) -> int:
        return self.nprocs // self.nodes

    def rank_env(self, rank: int, port: int) -> dict[str, str]:
        """The environment torchrun would give ``rank``, plus the per-node NCCL host id."""
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(self.nprocs),
            "LOCAL_WORLD_SIZE": str(self.procs_per_node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **NVLS_OFF,
        }
        if self.use_gpus and self.nodes > 1:
            env.update(
                NCCL_HOSTID=f"emu-node{rank // self.procs_per_node}",
                NCCL_SOCKET_IFNAME="lo",
                NCCL_IB_DISABLE="1",
            )
        return env


class WorkerFailed(RuntimeError):
    """A rank raised. Its message is one line, the exception the rank raised; ``traceback`` holds the rest.

    Several ranks' interleaved tracebacks (each failing at once, or one after its peer vanished) bury
    the cause; the first failure's last line usually is the cause. ``log`` is the file the rank wrote
    its full traceback to, if it could.
    """

    def __init__(self, rank: int, traceback: str, log: Path | None):
        self.rank, self.traceback, self.log = rank, traceback, log
        where = f"full traceback in {log}" if log is not None else "rerun with --debug for the full traceback"
        super().__init__(f"rank {rank} failed: {_raised(traceback)} ({where})")


def _raised(traceback: str) -> str:
    """The exception line(s) of a formatted traceback, without the module path of the exception type."""
    text = traceback.rsplit("Traceback (most recent call last):", 1)[-1]
    lines = text.strip("\n").splitlines()
    first = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), len(lines) - 1)
    raised = " ".join(line.strip() for line in lines[first:])
    return re.sub(r"^(?:\w+\.)+(?=\w+(?::|$))", "", raised)


def under_torchrun() -> bool:
    """True when an external launcher (torchrun, Slurm + torchrun) already started every rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_WORLD_SIZE" in os.environ


def restart_hazard() -> str | None:
    """Why torchrun's restarts may fail to reconnect the workers here, or None.

    By default torchrun (c10d rendezvous) shares one store with every attempt's workers, and nothing
    clears the keys a dead attempt left: a restarted rank can read the old peers' addresses and fail
    to connect (pytorch/pytorch#135712; seen on torch 2.13 with gloo, in a second restart).
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return (
            "torchrun shares its rendezvous store with the workers, so a restart can read the previous "
            "attempt's addresses and fail to connect (pytorch/pytorch#135712); "
            "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (examples/slurm.sbatch does)"
        )
    return None


def show_warnings_as_lines(prog: str, debug: bool = False) -> None:
    """Warnings as ``<prog>: warning: <message>``, one line each (``debug``: Python's usual form, with the source)."""
    if not debug:
        warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {' '.join(str(message).split())}\n"


@contextlib.contextmanager
def native_output_to(log: Path) -> Iterator[None]:
    """Send what native code (c10d, gloo, NCCL) writes to stderr into ``log``; Python's own stderr stays.

    A spawned worker shares the launcher's terminal, where the command promises one line per failure;
    c10d's connect retries and gloo's teardown notices would interleave with it, from every rank. Python
    writes (warnings, which torchmics words for users) keep going to the terminal through a duplicate of
    the original descriptor. ``log`` is removed when nothing was written to it.
    """
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(log, "ab") as native:
        os.dup2(native.fileno(), 2)
    previous = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=previous.encoding, errors=previous.errors)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr.close()
        sys.stderr = previous
        if log.is_file() and log.stat().st_size == 0:
            log.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one rank's ``fn(*args)`` and destroy the process group it started, even when it raises.

    Exiting with a live NCCL group skips waiting for its pending operations (NCCL warns about it at exit).
    After a normal return every rank first meets the others at a barrier: a rank that tears its gloo
    group down while a peer still talks to it can abort (seen once in CI as SIGABRT at exit).
    """
    try:
        result = fn(*args)
        if dist.is_initialized():
            dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _LaunchersDescriptor:
    """One of the launcher's file descriptors as it is at this launch, for a rank to write to.

    A fork server's ranks inherit the server's descriptors, which are the launcher's when the server
    started: output redirected since (a later launch's log, pytest's capture of another test) would
    go to the old place. Pickled, it is passed to the rank as multiprocessing passes descriptors.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _received_descriptor, (reduction.DupFd(self.fd),)


def _received_descriptor(duplicate: Any) -> int:
    return duplicate.detach()


def _worker(rank: int, launch: LocalLaunch, port: int, environ: dict[str, str], forked: bool,
            stdio: tuple[int, int], native_logs: Callable[[int], Path] | None, fn: Callable[..., Any], args: tuple) -> None:
    _take_over_the_launch(environ | launch.rank_env(rank, port), stdio, forked)
    with native_output_to(native_logs(rank)) if native_logs else contextlib.nullcontext():
        run_rank(fn, *args)


def _take_over_the_launch(environ: dict[str, str], stdio: tuple[int, int], forked: bool) -> None:
    """Give this rank what a spawned rank gets fresh and a forked one would inherit from the fork server
    as it was when the server started: the launcher's environment, its stdout and stderr, and (as
    importing torch gives) a default generator seeded on its own, not the one every rank shares."""
    os.environ.clear()
    os.environ.update(environ)
    sys.stdout.flush()
    sys.stderr.flush()
    for target, received in zip((1, 2), stdio):
        if received != target:
            os.dup2(received, target)
            os.close(received)
    if forked:
        torch.default_generator.seed()


def _start_method(launch: LocalLaunch) -> str:
    """CPU ranks fork from one server that imported torch and torchmics once, instead of each importing
    them afresh (about 2.4 s of CPU per rank: 8 ranks on 2 cores waited 10 s before their first step).
    GPU ranks are spawned: a forked process cannot use CUDA if its parent initialized the driver, so a
    fork server is safe for GPUs only while nothing it imports does (unchecked on a GPU), and their start
    is small next to a GPU job.

    What torch's imports read from the environment (``OMP_NUM_THREADS`` when libgomp loads,
    ``TORCH_LOGS``) is fixed when the server starts, at the process's first CPU launch; ``_worker``
    restores ``os.environ`` only. The commands launch once per process, so this binds only code that
    calls :func:`spawn` several times with such variables changed in between."""
    if launch.use_gpus:
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed.fsdp", "torchmics"])
    return "forkserver"


def spawn(fn: Callable[..., Any], launch: LocalLaunch, *args: Any, timeout_s: float | None = None,
          native_logs: Callable[[int], Path] | None = None) -> None:
    """Run ``fn(*args)`` in ``launch.nprocs`` new processes (see :func:`_start_method`) and wait for all of them.

    If any rank raises, the others are terminated and the failing rank's traceback is re-raised here
    (``torch.multiprocessing.ProcessRaisedException``), so a crash never turns into a hang. With
    ``timeout_s`` a run that has not finished in time is killed with ``TimeoutError``, as it is on Ctrl-C. With
    ``native_logs``, rank ``r``'s native stderr goes to ``native_logs(r)`` (:func:`native_output_to`).
    """
    port = free_port()
    # One line per failure: stopping the other workers is what follows any failure, not news.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    method = _start_method(launch)
    context = mp.start_processes(
        _worker, args=(launch, port, dict(os.environ), method == "forkserver",
                       (_LaunchersDescriptor(1), _LaunchersDescriptor(2)), native_logs, fn, args),
        nprocs=launch.nprocs, join=False, start_method=method,
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{launch.nprocs} workers did not finish within {timeout_s:.0f} s")
    except (KeyboardInterrupt, TimeoutError):  # a rank stuck in a collective would outlive the launcher
        for process in context.processes:
            process.kill()
        raise
