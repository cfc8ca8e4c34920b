"""Models too large for one rank: build on ``meta``, then allocate and initialize only each rank's shards.

:func:`meta_init` builds a model whose parameters take no memory; :func:`torchmics.shard` then
materializes it (:func:`materialize`): each rank allocates its shards on the device and fills them.
Initialization must not depend on how the model is cut, so the values are defined per *module*:
every module that owns parameters is initialized with the model's own rule (a Hugging Face model's
``_init_weights``, else the module's ``reset_parameters``) from a generator seeded with
``(seed, module name)``. To run that rule unchanged, one unit at a time gets full-size tensors on the
device, is initialized, and hands each rank its slice; so at most one unit is ever whole on a rank,
and the same seed gives the same full weights on any world size, partition size, wrapping,
activation checkpointing or compilation. :func:`init_weights` applies the same rule to a model built
on a real device, which is how a model built whole and a model built on ``meta`` agree.

The generator is the device's own: weights initialized on a GPU differ from those initialized on the
CPU with the same seed (as any two random streams do); the distribution is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers that insert a module level without changing what the parameters are (their state_dict
# hooks remove the same names): initialization ignores them, so wrapping never changes the weights.
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")

Initializer = Callable[[nn.Module], None]


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    """Build models inside this context with their parameters on ``meta`` and their buffers real.

    Parameters are what makes a model big; buffers (rotary frequencies, causal masks) are small and
    computed in constructors, and on ``meta`` their values would be lost. So, as accelerate's
    ``init_empty_weights(include_buffers=False)`` does, every parameter is moved to ``meta`` as it
    is registered, and the rest of the constructor runs as usual.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def init_weights(model: nn.Module, seed: int | None = None) -> None:
    """Initialize a model built on a real device in place, exactly as a ``meta`` model is materialized.

    ``seed`` defaults to ``torch.initial_seed()`` (what ``torch.manual_seed`` set). Every parameter
    must be written by some module's rule; one that is not raises (it would keep arbitrary values).
    """
    seed = torch.initial_seed() if seed is None else seed
    modules = _modules_post_order(model)
    params = {id(p): p for _, m in modules for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for p in params.values():
            _poison(p)
        _run_initializers(model, modules, seed, next(iter(params.values())).device if params else None)
        _check_written(modules)


def materialize(
    model: nn.Module, device: torch.device, seed: int, units: Sequence[nn.Module] = (), offload: bool = False
) -> None:
    """Allocate the parameters of a ``meta`` model on ``device`` and initialize them (see the module docs).

    For a model sharded with FSDP2 (:func:`torchmics.shard` does this itself), pass its ``units``
    (the root among them or not): each rank allocates only its shards, where FSDP2 keeps them (the
    CPU with ``offload``), and the full-size tensors used to initialize them live on ``device``, one
    unit at a time. A model that is not sharded is allocated whole and initialized in place, as
    peers that need the whole model (DDP) do. Buffers keep their values (see :func:`meta_init`).
    """
    refuse_meta_buffers(model)
    buffers = list(model.named_buffers(remove_duplicate=False))  # every name of a shared buffer
    model.to_empty(device="cpu" if offload else device)
    moved: dict[int, torch.Tensor] = {}
    for name, buffer in buffers:  # to_empty replaced the buffers with uninitialized ones
        module_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_path), attr, moved.setdefault(id(buffer), buffer.to(device)))
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        init_weights(model, seed)
        return
    for group in _unit_groups(model, list(units)):
        _initialize_group(model, group, device, seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the largest unit's full-size blocks would otherwise stay reserved


def refuse_meta_buffers(model: nn.Module) -> None:
    """Buffers must be real before materializing: their values come from constructors, not from a seed."""
    lost = [name for name, b in model.named_buffers() if b.is_meta]
    if lost:
        raise ValueError(
            f"buffers {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''} are on the meta device, so their "
            "values are lost (a plain `with torch.device('meta')` does that). Build the model under "
            "`with torchmics.meta_init():`, which keeps buffers real and puts only parameters on meta."
        )


def _modules_post_order(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) children before parents, as ``nn.Module.apply`` visits them; shared modules once."""
    seen: set[int] = set()
    order: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        order.append((name, module))

    visit("", root)
    return order


def _unit_groups(model: nn.Module, units: list[nn.Module]) -> list[list[tuple[str, nn.Module]]]:
    """The model's modules grouped by the unit that holds their parameters (the root holds the rest)."""
    unit_ids = {id(u) for u in units} | {id(model)}
    groups: dict[int, list[tuple[str, nn.Module]]] = {}

    def visit(name: str, module: nn.Module, owner: int) -> None:
        owner = id(module) if id(module) in unit_ids else owner
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, owner)
        groups.setdefault(owner, []).append((name, module))

    visit("", model, id(model))
    return list(groups.values())


def _initialize_group(model: nn.Module, group: list[tuple[str, nn.Module]], device: torch.device, seed: int) -> None:
    """Give ``group``'s modules full tensors, run their initializers, keep each rank's slice."""
    own = {id(p) for _, module in group for p in module.parameters(recurse=False)}
    outside = [(name, p) for name, p in model.named_parameters() if id(p) not in own]
    versions = [_version(p) for _, p in outside]  # to catch a rule writing another unit
    sharded: dict[int, DTensor] = {}
    full: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, DTensor]] = []
    for _, module in group:
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in full:
                sharded[id(p)] = p
                full[id(p)] = nn.Parameter(_poison(torch.empty(p.shape, dtype=p.dtype, device=device)), p.requires_grad)
            swapped.append((module, name, p))
            module._parameters[name] = full[id(p)]
    if not full:
        return
    try:
        with torch.no_grad():
            _run_initializers(model, group, seed, device)
            _refuse_writes_outside(outside, versions, group)
            _check_written(group)
            for key, p in sharded.items():
                local = distribute_tensor(full[key].data, p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(local.to_local())
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _version(p: DTensor) -> tuple[int, int]:
    """In-place writes through the DTensor bump its own counter; writes to its local shard, the shard's."""
    return p._version, p.to_local()._version


def _refuse_writes_outside(outside: list[tuple[str, DTensor]], versions: list[int], group: list) -> None:
    """A rule that writes a parameter of another unit would write a shard, not the full tensor: refuse it."""
    written = [name for (name, p), version in zip(outside, versions) if _version(p) != version]
    if written:
        unit = group[-1][0] or "the root"
        raise ValueError(
            f"initializing unit {unit!r} wrote {', '.join(written[:3])}, which belong to other units: torchmics "
            "initializes one unit at a time, so a rule must write only its module's subtree. Move that rule into "
            "the owning module's initializer, shard with units that contain both (wrap=...), or build the model "
            "on a real device and shard it initialized."
        )


def _run_initializers(model: nn.Module, modules: list[tuple[str, nn.Module]], seed: int, device: torch.device | None) -> None:
    """Each module's rule, from a generator seeded by ``(seed, its unwrapped name)``.

    Modules without parameters of their own run theirs too: a model-level rule may write a child's
    parameters (Hugging Face GPT-2 rescales ``c_proj`` from its parent), and order is post-order, as
    ``nn.Module.apply`` has it, so the parent's rule wins as it does there.
    """
    cuda = [device] if device is not None and device.type == "cuda" else []
    initializers = _initializers(model)
    with torch.random.fork_rng(devices=cuda):
        for path, module in modules:
            if id(module) in initializers:
                torch.manual_seed(_module_seed(seed, path))
                initializers[id(module)](module)


def _initializers(model: nn.Module) -> dict[int, Initializer]:
    """The rule for each module: the nearest enclosing ``_init_weights`` (HF, our GPT), else ``reset_parameters``."""
    rules: dict[int, Initializer] = {}

    def visit(module: nn.Module, owner: nn.Module | None) -> None:
        if callable(getattr(module, "_init_weights", None)):
            owner = module
        if owner is not None:
            rules[id(module)] = owner._init_weights
        elif callable(getattr(module, "reset_parameters", None)):
            rules[id(module)] = lambda m=module: m.reset_parameters()
        for child in module.children():
            visit(child, owner)

    visit(model, None)
    return rules


def _module_seed(seed: int, path: str) -> int:
    """A seed of its own for each module, from its name without wrapper levels."""
    name = ".".join(part for part in path.split(".") if part not in _WRAPPER_NAMES)
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that a parameter no rule writes is caught (integer tensors cannot be checked)."""
    with torch.no_grad():
        if t.is_floating_point():
            t.fill_(float("nan"))
    return t


def _check_written(modules: list[tuple[str, nn.Module]]) -> None:
    """Raise naming the first parameter of ``modules`` still NaN after every rule ran (see :func:`_poison`)."""
    for path, module in modules:
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and torch.isnan(p).any():
                raise ValueError(
                    f"parameter {f'{path}.{name}' if path else name} ({type(module).__name__}) is not set by any "
                    "initializer: its module has no reset_parameters() and the model no _init_weights(module) "
                    "covering it. Give the model an `_init_weights(self, module)` method (as Hugging Face models "
                    "have), or build it on a real device and pass it to shard() already initialized."
                )
