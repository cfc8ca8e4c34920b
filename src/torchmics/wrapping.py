"""Choosing the sharding units: which sub-modules gather their parameters together.

A unit's parameters are all-gathered in one collective just before it runs, so units should be
large enough to keep collectives efficient and small enough that one or two gathered units fit in
memory: for transformers, one unit per block. A parameter shared by two modules (tied embedding and
head) must live in one unit, so a candidate that shares a parameter with anything outside it is not
a valid unit.
"""

from __future__ import annotations

import torch.nn as nn


def _param_paths(model: nn.Module) -> list[tuple[str, int]]:
    """(module path, parameter id) for every use of every parameter, tied uses included."""
    return [(name.rpartition(".")[0], id(p)) for name, p in model.named_parameters(remove_duplicate=False)]


def _shares_params_with_outside(path: str, uses: list[tuple[str, int]]) -> bool:
    def inside(owner: str) -> bool:
        return owner == path or owner.startswith(path + ".")

    ids_in = {pid for owner, pid in uses if inside(owner)}
    return any(pid in ids_in for owner, pid in uses if not inside(owner))


def _auto_candidates(model: nn.Module) -> list[nn.Module]:
    """transformers' ``_no_split_modules`` if present, else the largest ``ModuleList``'s items, else children."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    if no_split:
        return [m for m in model.modules() if type(m).__name__ in no_split and m is not model]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        largest = max(lists, key=lambda lst: sum(p.numel() for p in lst.parameters()))
        return list(largest)
    return [child for child in model.children() if any(True for _ in child.parameters())]


def _no_match_message(model: nn.Module, wrap: tuple[type[nn.Module], ...]) -> str:
    """Why a ``wrap`` that matches nothing is refused: the whole model would be one unit, gathered at once."""
    wanted = ", ".join(c.__name__ for c in wrap)
    present = sorted({type(m).__name__ for m in model.modules() if m is not model})
    return (
        f"wrap=({wanted}) matches no sub-module of {type(model).__name__}, so the whole model would be one "
        f"unit, all-gathered at once. Pass the classes of its blocks (its modules are of the classes "
        f"{', '.join(present[:8])}{', ...' if len(present) > 8 else ''}), wrap=None to pick units automatically, "
        "or wrap=() for one unit on purpose."
    )


def resolve_units(model: nn.Module, wrap: tuple[type[nn.Module], ...] | None) -> list[nn.Module]:
    """Sub-modules to shard as units, children before parents (the order ``fully_shard`` needs).

    With ``wrap`` given, every instance of those classes is a unit, a unit that shares a parameter
    with the rest of the model is an error, and so is a ``wrap`` that matches no module (``()`` asks
    for the root alone). With ``wrap=None`` a candidate that shares a parameter is skipped: its
    parameters simply stay in the root unit.
    """
    paths = {module: path for path, module in model.named_modules()}
    uses = _param_paths(model)
    if wrap is None:
        candidates = _auto_candidates(model)
    else:
        if not isinstance(wrap, tuple) or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in wrap):
            raise TypeError(f"wrap must be a tuple of nn.Module classes or None, got {wrap!r}")
        candidates = [m for m in model.modules() if isinstance(m, wrap) and m is not model]
        if wrap and not candidates:
            raise ValueError(_no_match_message(model, wrap))
    units = []
    for module in candidates:
        if _shares_params_with_outside(paths[module], uses):
            if wrap is not None:
                raise ValueError(
                    f"cannot shard {paths[module]!r} ({type(module).__name__}) as its own unit: it shares a "
                    "parameter with a module outside it (tied weights). Wrap a module that contains both "
                    "users, or leave this class out of `wrap` so the root unit holds the shared parameter."
                )
            continue
        if any(True for _ in module.parameters()):
            units.append(module)
    order = {module: i for i, module in enumerate(model.modules())}
    return sorted(units, key=order.__getitem__, reverse=True)


def compile_units(model: nn.Module) -> None:
    """``torch.compile`` every unit in place, before sharding (as torchtitan does).

    Each unit compiles to one graph whose inputs are its gathered parameters, so FSDP2's gathers and
    frees stay outside the graphs and identical blocks share one compiled artifact.
    """
    for unit in resolve_units(model, None):
        unit.compile()
