"""Record which process groups carried which collectives, by wrapping torch.distributed's functions.

FSDP2 and torchmics both call these through the ``torch.distributed`` module, so the wrapper sees
every collective without any hook inside the code under test. The tensor collectives are counted under
their current names (``all_gather_single``, ``reduce_scatter_single``), also on a torch that still calls
them ``all_gather_into_tensor`` / ``reduce_scatter_tensor``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch.distributed as dist

from torchmics._fsdp import ALL_GATHER, REDUCE_SCATTER

COLLECTIVES = {"all_gather_single": ALL_GATHER, "reduce_scatter_single": REDUCE_SCATTER, "all_reduce": "all_reduce",
               "all_to_all_single": "all_to_all_single"}


@contextlib.contextmanager
def record_traffic() -> Iterator[Counter]:
    """Yields a Counter of (collective name, group ranks) -> calls made inside the block."""
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES.values()}

    def wrap(key, original):
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
            calls[(key, ranks)] += 1
            return original(*args, **kwargs)

        return recorded

    for key, name in COLLECTIVES.items():
        setattr(dist, name, wrap(key, originals[name]))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
