"""The configuration of a training run: one dataclass, filled from defaults, a TOML file, then flags."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Every knob of `torchmics train`. Flags and TOML keys share these names (``-`` or ``_``)."""

    model: str = "small"  # preset name or hf:<path to config.json>
    data: str | None = None  # text file / folder / .bin of uint16 tokens; None: the stdlib corpus
    nproc: int | None = None  # local processes; None: all GPUs, or 4 on CPU
    emulate_nodes: int | None = None  # None: 2 on CPU (so the hierarchy runs), 1 on GPUs
    gpus_per_node: int | None = None  # None: processes per (emulated) node
    partition_size: str = "auto"  # int, or auto: the planner's choice (the whole world on CPU)
    micro_batch: int = 8  # sequences per rank per micro-step
    accum: int = 2  # micro-steps per optimizer step (two-hop sync runs when > 1)
    seq_len: int | None = None  # None: the model's context length
    steps: int = 120
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 12
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixed_precision: str = "fp32"  # fp32 | bf16
    replica_reduce_dtype: str | None = None  # fp32 | bf16: the replica hop's own dtype (precision per hop)
    optimizer_over_replicas: bool = False  # shard optimizer states across replicas too (1/W of AdamW's state)
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    eval_every: int = 40
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: no periodic checkpoints (a final one still when --resume is set)
    resume: str | None = None  # None, "auto" (latest in --out) or a checkpoint path
    out: str = field(default_factory=lambda: f"runs/{time.strftime('%Y%m%d-%H%M%S')}")

    def validate(self) -> None:
        """Errors that need no processes: caught before anything is spawned."""
        positive = ("micro_batch", "accum", "steps", "eval_every", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("nproc", "emulate_nodes", "gpus_per_node", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("warmup", "checkpoint_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip <= 0:
            raise ValueError(f"--grad-clip must be > 0 (inf turns clipping off), got {self.grad_clip}")
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"--mixed-precision must be fp32 or bf16, got {self.mixed_precision!r}")
        if self.replica_reduce_dtype not in (None, "fp32", "bf16"):
            raise ValueError(f"--replica-reduce-dtype must be fp32 or bf16, got {self.replica_reduce_dtype!r}")
        if self.partition_size != "auto" and not str(self.partition_size).isdigit():
            raise ValueError(f"--partition-size must be a positive integer or 'auto', got {self.partition_size!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, min_lr={self.min_lr}")


_FIELD_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str, "bool": bool}


def _flag_type(f: dataclasses.Field) -> type:
    return _FIELD_TYPES[str(f.type)]


_TOML_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
    bool: ((bool,), "true or false"),
}


def _check_toml_value(path: Path, name: str, value: object) -> None:
    """TOML values come typed; a wrong one (``steps = "10"``) is named here instead of failing later."""
    if name == "partition_size":  # a string field only so that it can hold "auto"
        allowed, description = (int, str), 'an integer or "auto"'
    else:
        allowed, description = _TOML_KINDS[_flag_type(TrainConfig.__dataclass_fields__[name])]
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ValueError(f"{path}: {name} = {value!r} must be {description}")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per field; defaults stay unset so that a TOML file can fill them."""
    parser.add_argument("--config", help="TOML file with the same keys as the flags")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=_flag_type(f), default=None)
    return parser


def read_toml(path: Path) -> dict:
    """The TOML file's settings by field name; unknown keys and wrongly typed values are errors."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        values = {key.replace("-", "_"): value for key, value in tomllib.loads(path.read_text()).items()}
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from err
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys in {path}: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    for name, value in values.items():
        _check_toml_value(path, name, value)
    return values


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, overridden by the TOML file, overridden by flags given on the command line."""
    values = read_toml(Path(args.config)) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None and k in TrainConfig.__dataclass_fields__})
    if "partition_size" in values:
        values["partition_size"] = str(values["partition_size"])
    config = TrainConfig(**values)
    config.validate()
    return config
