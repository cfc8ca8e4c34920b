"""Steps all ranks take together, with one outcome for all: a failure anywhere raises everywhere.

Every rank saves and loads a checkpoint at once. A rank that failed a step alone would leave the
others waiting forever in the next collective, and a ``BaseException`` from DCP would slip past a
training loop's ``except Exception``; these helpers turn both into one ordinary error on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

_T = TypeVar("_T")


def on_rank0(fn: Callable[[], _T]) -> _T:
    """Run a file-system step once, on rank 0, and hand every rank its result or raise its error everywhere.

    Checks and renames must happen once; broadcasting the outcome means a failure on rank 0 raises on
    every rank instead of leaving the others waiting forever in the next collective.
    """
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (True, fn())
        except Exception as err:  # re-raised below, on every rank
            outcome[0] = (False, err)
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def on_every_rank(fn: Callable[[], _T]) -> list[_T]:
    """Run ``fn`` on every rank and hand every rank all results by rank, or the first rank's error everywhere.

    The gather is also a barrier; a rank that fails still joins it, so no rank is left waiting.
    """
    try:
        mine: tuple[bool, Any] = (True, fn())
    except Exception as err:  # re-raised below, on every rank
        mine = (False, err)
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


@contextlib.contextmanager
def ordinary_error(action: str, advice: str) -> Iterator[None]:
    """Re-raise DCP's failures as a ``RuntimeError`` naming the action, each distinct cause and its ranks.

    DCP raises ``CheckpointException``, a ``BaseException`` that ``except Exception`` in a training
    loop would not catch; a failed save or an unsuitable checkpoint is an ordinary error.
    """
    try:
        yield
    except CheckpointException as err:
        ranks_by_cause: dict[str, list[int]] = {}
        for rank, (exc, _) in sorted(err.failures.items()):
            ranks_by_cause.setdefault(repr(exc), []).append(rank)
        causes = "; ".join(f"{_ranks(ranks)}: {cause}" for cause, ranks in ranks_by_cause.items())
        raise RuntimeError(f"{action} failed ({causes}). {advice}") from err


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"{len(ranks)} ranks (first {ranks[0]})"
