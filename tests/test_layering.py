"""Imports run one way: core <- models <- plan, train, bench <- cli, and no module imports itself back.

The core (``torchmics/*.py`` and ``torchmics/checkpoint/``: sharding, collectives, checkpoints, the
launcher, ...) is what a user of the API gets; the commands are built on it and never the other way
round, so the API can be used, tested and changed without the commands. Every import counts, including
those inside functions and under ``TYPE_CHECKING``: a lazy import hides a dependency from Python, not
from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# What each layer may import (besides itself); cli.py is the top and may import anything.
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "data": {"core"},
    "plan": {"core", "models"},
    "train": {"core", "models", "data", "plan"},
    "bench": {"core", "models"},
}


def layer_of(module: str) -> str:
    """``torchmics.plan.cost`` -> ``plan``; the rest is ``core`` (``sharding``, ``checkpoint.save``...)."""
    parts = module.split(".")
    if parts[1:] == ["cli"]:
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "core"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the ``torchmics`` package under ``root``, by dotted name (a package by its own)."""
    found = {}
    for path in sorted((root / "torchmics").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The torchmics modules ``path`` imports, anywhere in it; ``from pkg import mod`` names the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {m for m in found if m == "torchmics" or m.startswith("torchmics.")}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(path, name, set(known)) - {name} for name, path in known.items()}


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the layering, as ``importer -> imported``."""
    wrong = []
    for importer, imported in graph.items():
        layer = layer_of(importer)
        if layer == "cli":
            continue
        allowed = ALLOWED[layer] | {layer}
        wrong += [f"{importer} -> {m}" for m in sorted(imported) if layer_of(m) not in allowed]
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that can reach itself again (depth-first search)."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for nxt in sorted(graph.get(module, ())):
            visit(nxt, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_the_analysis_sees_the_whole_package():
    graph = import_graph()
    assert {"torchmics.sharding", "torchmics.launch", "torchmics.plan.auto", "torchmics.cli"} <= set(graph)
    assert "torchmics.launch" in graph["torchmics.bench.runner"]  # `from torchmics.launch import ...`
    assert "torchmics.checkpoint" in graph["torchmics.train.loop"]  # `from torchmics import checkpoint`
    assert "torchmics.checkpoint.folders" in graph["torchmics.checkpoint.save"]  # a core package's modules
    assert layer_of("torchmics.checkpoint.save") == "core"


def test_imports_run_from_the_commands_down_to_the_core():
    assert backward_imports(import_graph()) == []


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("files", "expected_wrong", "expected_cycles"),
    [
        ({"sharding.py": "from torchmics.train import loop\n", "train/loop.py": ""},
         ["torchmics.sharding -> torchmics.train.loop"], 0),
        ({"plan/cost.py": "def f():\n    from ..bench import runner\n", "bench/runner.py": ""},
         ["torchmics.plan.cost -> torchmics.bench.runner"], 0),
        ({"checkpoint/save.py": "from torchmics.train import loop\n", "train/loop.py": ""},
         ["torchmics.checkpoint.save -> torchmics.train.loop"], 0),
        ({"bench/a.py": "from torchmics.bench import b\n", "bench/b.py": "import torchmics.bench.a\n"}, [], 1),
    ],
)
def test_the_checks_catch_what_they_forbid(tmp_path, files, expected_wrong, expected_cycles):
    for name, text in {"__init__.py": "", **files}.items():
        path = tmp_path / "torchmics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    graph = import_graph(tmp_path)
    assert backward_imports(graph) == expected_wrong
    assert len(cycles(graph)) == expected_cycles
