import os
import sys

import pytest

# Workers are spawned fresh; they import test helpers by module name, so tests/ must be importable.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def no_spawn(monkeypatch):
    """`torchmics train` may not start workers: its preflight must reject the input first."""
    from torchmics.train import command

    def refuse(*args, **kwargs):
        raise AssertionError("a worker was spawned for input that preflight should have rejected")

    monkeypatch.setattr(command, "spawn", refuse)
