"""Record which process groups carried which collectives, by wrapping torch.distributed's functions.

FSDP2 and torchmics both call these through the ``torch.distributed`` module, so the wrapper sees
every collective without any hook inside the code under test.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch.distributed as dist

COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")


@contextlib.contextmanager
def record_traffic() -> Iterator[Counter]:
    """Yields a Counter of (collective name, group ranks) -> calls made inside the block."""
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, original):
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
            calls[(name, ranks)] += 1
            return original(*args, **kwargs)

        return recorded

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
