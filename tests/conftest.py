import os
import sys

# Workers are spawned fresh; they import test helpers by module name, so tests/ must be importable.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
