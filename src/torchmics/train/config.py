"""The configuration of a training run: one dataclass, filled from defaults, a TOML file, then flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from torchmics import fault_tolerance
from torchmics.dtypes import QUANTIZED_DTYPES, REPLICA_HOP_FORMATS, TRAINING_DTYPES
from torchmics.models import PRESETS, schedules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Every knob of `torchmics train`. Flags and TOML keys share these names (``-`` or ``_``)."""

    model: str = "small"  # preset name or hf:<path to config.json>
    data: str | None = None  # token file (prepare-data) / .bin of uint16 tokens / text file or folder; None: stdlib
    nproc: int | None = None  # local processes; None: all GPUs, or 4 on CPU
    emulate_nodes: int | None = None  # None: 2 on CPU for an even nproc (so the hierarchy runs), else 1
    gpus_per_node: int | None = None  # None: processes per (emulated) node
    partition_size: str = "auto"  # int, or auto: the planner's choice (the whole world on CPU)
    micro_batch: int = 8  # sequences per rank per micro-step
    accum: int = 2  # micro-steps per optimizer step (two-hop sync runs when > 1)
    seq_len: int | None = None  # None: the model's context length
    steps: int = 120
    lr: float | None = None  # None: the GPT-3 paper's value for the model's size (see models/schedules.py)
    min_lr: float | None = None  # None: 10% of lr
    warmup: int | None = None  # None: GPT-3's 375M tokens, at most 10% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixed_precision: str = "fp32"  # fp32 | bf16
    replica_reduce_dtype: str | None = None  # fp32 | bf16 | int8 | fp8: the replica hop's own format (precision per hop)
    error_feedback: bool = True  # int8 / fp8 replica hop: carry each step's quantization error into the next
    optimizer_over_replicas: bool = False  # shard optimizer states across replicas too (1/W of AdamW's state)
    activation_checkpointing: bool = False
    compile: bool = False
    cpu_offload: bool = False  # sharded params, grads and optimizer states in host memory (FSDP2 CPUOffloadPolicy)
    random_init: bool = False  # start from random weights even when --model hf:DIR holds pretrained ones
    seed: int = 0
    eval_every: int = 40
    eval_batches: int = 4
    log_every: int = 10  # steps per log interval: losses are read and time is measured once per interval
    max_skipped_steps: int = 0  # consecutive non-finite steps skipped before stopping (> 0: one device sync per step)
    checkpoint_every: int = 0  # 0: no periodic checkpoints (a final one still when --resume is set)
    keep_checkpoints: int | None = None  # None: keep every checkpoint; N: the newest N (and the resumed one)
    tensorboard: bool = False  # TensorBoard event files in <out>/tensorboard
    wandb: bool = False  # a Weights & Biases run (WANDB_MODE=offline: files in <out>/wandb, no network)
    wandb_project: str | None = None  # None: $WANDB_PROJECT, else torchmics
    resume: str | None = None  # None, "auto" (latest in --out) or a checkpoint path
    fault_tolerant: bool = False  # this job is one torchft replica group: survives other groups' failures
    lighthouse: str | None = None  # torchft lighthouse, http://HOST:PORT; None: $TORCHFT_LIGHTHOUSE
    replica_group: int | None = None  # under --fault-tolerant: this group's index (its torchft replica id)
    replica_groups: int | None = None  # under --fault-tolerant: the job's groups; each trains its 1/N of the batch
    out: str = field(default_factory=lambda: f"runs/{time.strftime('%Y%m%d-%H%M%S')}")

    def __post_init__(self) -> None:
        self.lr, self.min_lr = schedules.fill_lrs(self.model, self.lr, self.min_lr)

    def validate(self) -> None:
        """Errors that need no processes: caught before anything is spawned."""
        positive = ("micro_batch", "accum", "steps", "eval_every", "eval_batches", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("nproc", "emulate_nodes", "gpus_per_node", "seq_len", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("lr", "min_lr", "weight_decay"):  # NaN passes every comparison below; inf diverges at once
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        for name in ("warmup", "checkpoint_every", "weight_decay", "max_skipped_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.grad_clip > 0:  # also NaN
            raise ValueError(f"--grad-clip must be > 0 (inf turns clipping off), got {self.grad_clip}")
        if self.mixed_precision not in CHOICES["mixed_precision"]:
            raise ValueError(f"--mixed-precision must be fp32 or bf16, got {self.mixed_precision!r}")
        if self.replica_reduce_dtype not in (None, *CHOICES["replica_reduce_dtype"]):
            raise ValueError(f"--replica-reduce-dtype must be one of {', '.join(REPLICA_HOP_FORMATS)}, "
                             f"got {self.replica_reduce_dtype!r}")
        if not self.error_feedback and self.replica_reduce_dtype not in QUANTIZED_DTYPES:
            raise ValueError("--no-error-feedback applies to a quantized replica hop only: add "
                             "--replica-reduce-dtype int8 (or fp8), or drop --no-error-feedback")
        if self.cpu_offload and (self.optimizer_over_replicas or self.replica_reduce_dtype):
            raise ValueError("--cpu-offload cannot be combined with --optimizer-over-replicas or --replica-reduce-dtype: "
                             "their replica hop runs on gradient shards, which offloading keeps in host memory")
        if self.partition_size != "auto" and not str(self.partition_size).isdigit():
            raise ValueError(f"--partition-size must be a positive integer or 'auto', got {self.partition_size!r}")
        self._refuse_flags_without_effect()
        self._validate_fault_tolerance()
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, min_lr={self.min_lr}")

    def _refuse_flags_without_effect(self) -> None:
        """A flag that would change nothing is probably missing its partner flag: say which."""
        if self.wandb_project is not None and not self.wandb:
            raise ValueError("--wandb-project only applies with --wandb: add --wandb, or drop --wandb-project")
        if self.keep_checkpoints is not None and self.checkpoint_every == 0 and self.resume is None:
            raise ValueError("--keep-checkpoints only applies to a run that saves checkpoints: add --checkpoint-every N, "
                             "or drop --keep-checkpoints")

    def _validate_fault_tolerance(self) -> None:
        given = [name for name in ("lighthouse", "replica_group", "replica_groups") if getattr(self, name) is not None]
        if not self.fault_tolerant:
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} only applies with --fault-tolerant")
            return
        if self.replica_group is None or self.replica_groups is None:
            raise ValueError("--fault-tolerant needs --replica-group G (this group's index) and --replica-groups N "
                             "(how many groups the job has), the same N for every group")
        if not 0 <= self.replica_group < self.replica_groups:
            raise ValueError(f"--replica-group must be in 0..{self.replica_groups - 1} for --replica-groups "
                             f"{self.replica_groups}, got {self.replica_group}")
        refused = fault_tolerance.unsupported(self.optimizer_over_replicas, self.cpu_offload,
                                              self.replica_reduce_dtype in QUANTIZED_DTYPES)
        if refused:
            raise ValueError(f"--fault-tolerant: {refused}")


_FIELD_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float, "str": str, "str | None": str,
                "bool": bool}


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


_PRESETS = ", ".join(PRESETS)

# What each flag does, its allowed values, and for a default of None what that means; build_parser
# appends the default itself and CHOICES. Every field needs an entry (one line of `train --help`).
HELP: dict[str, str] = {
    "model": f"a GPT preset ({_PRESETS}) or hf:<config.json or folder> for a transformers causal LM",
    "data": "training tokens: a token file of `torchmics prepare-data`, a headerless .bin of uint16 tokens "
    "(nanoGPT's), or a text file or folder read as bytes (default: the Python standard library's source, byte-level)",
    "nproc": "processes to start on this machine, >= 1 (default: one per GPU, or 4 on CPU)",
    "emulate_nodes": "split the local processes into this many emulated nodes, >= 1, dividing --nproc "
    "(default: 2 on CPU for an even --nproc, so the hierarchical collectives run; else 1)",
    "gpus_per_node": "ranks per node the topology assumes, >= 1 (default: processes per node)",
    "partition_size": "ranks that shard one model replica: an integer dividing the world size, or auto "
    "(the planner's choice; the whole world on CPU)",
    "micro_batch": "sequences per rank per micro-step, >= 1",
    "accum": "micro-steps per optimizer step, >= 1 (two-hop gradient sync runs when > 1)",
    "seq_len": "tokens per sequence, >= 1 (default: the model's context length)",
    "steps": "optimizer steps to train, >= 1",
    "lr": "peak learning rate, > 0 (default: the GPT-3 paper's value for the model's size)",
    "min_lr": "final learning rate of the cosine decay, 0 <= min-lr <= lr (default: 10%% of --lr)",
    "warmup": "linear warmup steps, >= 0 (default: GPT-3's 375M tokens, at most 10%% of the steps)",
    "weight_decay": "AdamW weight decay, >= 0",
    "grad_clip": "clip the global gradient norm to this, > 0 (inf: no clipping)",
    "mixed_precision": "compute dtype of parameters in forward and backward (bf16 reduces in fp32)",
    "replica_reduce_dtype": "format of the gradient hop across replicas: a dtype, or int8 / fp8 blocks with "
    "one scale per 256 elements (default: the partition group's reduce dtype)",
    "error_feedback": "with an int8 / fp8 replica hop, add each step's quantization error to the next step's "
    "gradient (the residuals take 4 bytes per sharded parameter)",
    "optimizer_over_replicas": "also shard optimizer states across replicas (1/world of AdamW's state per rank)",
    "activation_checkpointing": "recompute each block's activations in backward, to save memory",
    "compile": "torch.compile each sharded unit, and the loss (a fused fp32 cross-entropy)",
    "cpu_offload": "keep sharded parameters, gradients and optimizer states in host memory",
    "random_init": "start from random weights even when --model hf:<folder> holds pretrained ones",
    "seed": "seed of initialization and data order",
    "eval_every": "steps between validation-loss evaluations, >= 1 (the last step always evaluates)",
    "eval_batches": "batches per validation-loss evaluation, >= 1",
    "log_every": "steps per log interval (losses are read and time measured once per interval), >= 1",
    "max_skipped_steps": "consecutive steps with a non-finite gradient to skip before stopping, >= 0 "
    "(> 0 costs one device sync per step)",
    "checkpoint_every": "steps between checkpoints in --out, >= 0 (0: none, except a final one when --resume is set)",
    "keep_checkpoints": "keep only the newest N checkpoints, >= 1; the one the run resumed from is never "
    "deleted (default: keep all)",
    "resume": "continue from a checkpoint: auto (the newest undamaged one in --out, if any) or a step_<N> "
    "folder; later checkpoints of --out are moved aside (default: a fresh run)",
    "tensorboard": "write every metric and the config as TensorBoard event files in <out>/tensorboard "
    "(needs torchmics[tracking])",
    "wandb": "log every metric and the config to a Weights & Biases run (needs torchmics[tracking]; "
    "with WANDB_MODE=offline it is written to <out>/wandb without network, for `wandb sync` later)",
    "wandb_project": "the W&B project of --wandb runs (default: $WANDB_PROJECT, else torchmics)",
    "fault_tolerant": "this job is one replica group of a torchft job: it survives other groups' failures and "
    "rejoins from a live group after its own (needs torchmics[ft] and a lighthouse; its world is one partition group)",
    "lighthouse": "the torchft lighthouse of --fault-tolerant, http://HOST:PORT (default: $TORCHFT_LIGHTHOUSE)",
    "replica_group": "this group's index under --fault-tolerant, 0..N-1: its torchft replica id and its rows of the "
    "batch (no default: --fault-tolerant needs it)",
    "replica_groups": "how many replica groups the --fault-tolerant job has (N): each trains 1/N of the global batch "
    "(no default: --fault-tolerant needs it, the same on every group)",
    "out": "the run folder: metrics, plot, checkpoints; one job at a time, never another run's results",
}
CHOICES: dict[str, tuple[str, ...]] = {"mixed_precision": TRAINING_DTYPES, "replica_reduce_dtype": REPLICA_HOP_FORMATS}
_DEFAULT_SHOWN = {"out": "runs/<date>-<time>"}  # a default computed when the run starts


def _help(f: dataclasses.Field) -> str:
    """HELP's text, then the default and the allowed values where HELP does not say them."""
    parts = [HELP[f.name]]
    if f.name in CHOICES:
        parts.append(f"one of: {', '.join(CHOICES[f.name])}")
    default = _DEFAULT_SHOWN.get(f.name, f.default)
    if default is not None:
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        parts.append(f"default: {shown}")
    return "; ".join(parts)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per field, with its help; defaults stay unset so that a TOML file can fill them."""
    parser.add_argument("--config", help="TOML file with the same keys as the flags (flags given override it)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error, not one line")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
        else:
            parser.add_argument(flag, type=_flag_type(f), default=None, choices=CHOICES.get(f.name), help=_help(f))
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
