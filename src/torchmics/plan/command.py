"""`torchmics plan` and `torchmics simulate`: the planner and the weak-scaling simulator on the command line.

Both describe a model (a preset, a Hugging Face ``config.json``, or a bare shape), a cluster (a shipped
profile, optionally calibrated on ``torchmics bench`` results) and a training setting, and print
markdown, so that ``> file.md`` keeps a readable, committed record of the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from torchmics.arguments import non_negative_float, positive_float, positive_int
from torchmics.dtypes import DTYPES, REPLICA_HOP_FORMATS
from torchmics.plan import failure
from torchmics.plan.calibrate import calibrate
from torchmics.plan.cluster import ClusterProfile, get_profile, with_gpus_per_node
from torchmics.plan.model_spec import ModelSpec
from torchmics.plan.planner import (
    DEFAULT_MEMORY_FRACTION,
    explain,
    plan,
    recommend,
    render_table,
)
from torchmics.plan.simulate import default_sizes, render_rows, simulate, smallest_default_size, write_outputs
from torchmics.plan.strategy import Strategy, options

SHAPE_FLAGS = ("params", "layers", "d_model")  # a bare shape needs all three


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register both subcommands: they share the model, cluster and training flags."""
    p = subparsers.add_parser(
        "plan",
        help="choose the partition size: memory and predicted speed of every candidate",
        description="Evaluates every node-aligned partition size (flat and hierarchical where a group "
        "spans nodes) with the memory and cost models, and recommends one.",
    )
    _add_common(p, default_cluster="h100-3200")
    p.add_argument("--nodes", type=positive_int, required=True, help="nodes of --gpus-per-node GPUs")
    p.set_defaults(run=run_plan)

    s = subparsers.add_parser(
        "simulate",
        help="predict weak scaling of ZeRO-3, MiCS and DDP past the cluster you have",
        description="Tokens/s per GPU and scaling efficiency from one node to --max-gpus GPUs, by the "
        "cost model; MiCS uses the planner's partition size at every size.",
    )
    _add_common(s, default_cluster="p4d")
    s.add_argument("--max-gpus", type=positive_int, default=1024,
                   help="largest cluster of the default sizes (default: %(default)s)")
    s.add_argument("--gpus", type=cluster_sizes, default=None, help="comma-separated sizes (default: powers of two)")
    s.add_argument("--out", default=None, help="output folder (default benchmarks/simulate/<cluster>-<model>)")
    s.set_defaults(run=run_simulate)


def _add_common(p: argparse.ArgumentParser, default_cluster: str) -> None:
    model = p.add_argument_group("model: --model, or a bare shape (--params, --layers, --d-model)")
    model.add_argument("--model", default=None, help="preset name (mics-100b, 1.4b, ...) or hf:<config.json>")
    model.add_argument("--params", type=positive_float, default=None, help="parameter count, e.g. 13e9")
    model.add_argument("--layers", type=positive_int, default=None)
    model.add_argument("--d-model", type=positive_int, default=None)
    model.add_argument("--heads", type=positive_int, default=None, help="default: d_model / 128")
    model.add_argument("--vocab-size", type=positive_int, default=50304, help="default: %(default)s")
    model.add_argument("--seq-len", type=positive_int, default=None, help="default: the model's (2048 for a shape)")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--cluster", default=default_cluster,
                         help="a profile of torchmics.plan.PROFILES (default: %(default)s)")
    cluster.add_argument("--gpus-per-node", type=positive_int, default=None, help="default: the profile's")
    cluster.add_argument("--calibrate", action="append", default=[], metavar="RESULTS_JSONL",
                         help="fit links and MFU to `torchmics bench` results (repeatable, applied in order)")
    cluster.add_argument("--network-latency-us", type=non_negative_float, default=None,
                         help="override the network's latency per ring step (a what-if)")
    train = p.add_argument_group("training")
    train.add_argument("--micro-batch", type=positive_int, default=4, help="sequences per GPU per micro-step (default: %(default)s)")
    train.add_argument("--accum", type=positive_int, default=1, help="micro-steps per optimizer step (default: %(default)s)")
    train.add_argument("--activation-checkpointing", action="store_true")
    train.add_argument("--param-dtype", choices=tuple(DTYPES), default="bf16", help="default: %(default)s")
    train.add_argument("--reduce-dtype", choices=tuple(DTYPES), default="fp32", help="default: %(default)s")
    train.add_argument("--replica-reduce-dtype", choices=REPLICA_HOP_FORMATS, default=None,
                       help="format of the replica hop alone (precision per hop; int8 / fp8: quantized blocks "
                       "with error feedback); default: --reduce-dtype")
    train.add_argument("--optimizer-over-replicas", action="store_true",
                       help="shard optimizer states across replicas too (torchmics.ReplicaShardedOptimizer)")
    train.add_argument("--cpu-offload", action="store_true",
                       help="keep sharded parameters, gradients and optimizer states in host memory")
    failures = p.add_argument_group("what a failure costs (with and without train --fault-tolerant)")
    failures.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints (default: %(default)s)")
    failures.add_argument("--restart-s", type=positive_float, default=300.0,
                          help="seconds from a failure to the restarted ranks' first step (default: %(default)s)")


def failure_line(args: argparse.Namespace, world: int, partition_size: int, step_s: float) -> str:
    """What one failure costs this job, with and without fault-tolerant replica groups."""
    cost = failure.failure_cost(world, partition_size, step_s, args.checkpoint_every, args.restart_s)
    return failure.describe(cost, world, partition_size, args.checkpoint_every, args.restart_s)


def cluster_sizes(text: str) -> list[int]:
    """An argparse type for ``--gpus 64,128,256``."""
    return [positive_int(size) for size in text.split(",")]


def model_from_args(args: argparse.Namespace) -> tuple[str, ModelSpec]:
    """(a name for titles, the spec) from ``--model`` or the bare-shape flags; exactly one of them."""
    shape = [getattr(args, flag) for flag in SHAPE_FLAGS]
    if args.model is not None and any(v is not None for v in [*shape, args.heads]):
        raise ValueError("give either --model or a bare shape (--params, --layers, --d-model, --heads), not both")
    if args.heads is not None and args.d_model is not None and args.d_model % args.heads:
        raise ValueError(f"--heads {args.heads} must divide --d-model {args.d_model} (each head has d_model / heads channels)")
    if args.model is not None:
        spec, name = ModelSpec.from_name(args.model), _short_name(args.model)
    elif all(v is not None for v in shape):
        heads = args.heads or max(1, args.d_model // 128)
        params = int(args.params)
        spec = ModelSpec.from_shape(args.layers, args.d_model, heads, 2048, args.vocab_size, num_params=params)
        name = f"{args.params / 1e9:g}b"
    else:
        raise ValueError("describe the model: --model PRESET|hf:config.json, or --params N --layers L --d-model D")
    return name, dataclasses.replace(spec, seq_len=args.seq_len or spec.seq_len)


def _short_name(model: str) -> str:
    """``hf:models/llama/config.json`` -> ``llama``; a preset stays as it is."""
    if not model.startswith("hf:"):
        return model
    path = Path(model.removeprefix("hf:"))
    return (path.parent.name if path.suffix == ".json" else path.name) or "hf"


def cluster_from_args(args: argparse.Namespace) -> ClusterProfile:
    """The named profile, regrouped to ``--gpus-per-node``, then calibrated, then any what-if applied."""
    profile = get_profile(args.cluster)
    if args.gpus_per_node is not None:
        profile = with_gpus_per_node(profile, args.gpus_per_node)
    for path in args.calibrate:
        profile = calibrate(profile, path)
    if args.network_latency_us is not None:
        inter = dataclasses.replace(profile.inter, alpha=args.network_latency_us * 1e-6)
        profile = dataclasses.replace(profile, name=f"{profile.name}-latency{args.network_latency_us:g}us", inter=inter)
    return profile


def options_from_args(args: argparse.Namespace) -> Strategy:
    """Precision and placement shared by every candidate (two-hop sync on, as torchmics runs it)."""
    return options(args.param_dtype, args.reduce_dtype, args.replica_reduce_dtype, args.optimizer_over_replicas,
                   args.cpu_offload)


def setting(args: argparse.Namespace, model: ModelSpec, cluster: ClusterProfile) -> str:
    """The lines above a table: what was modelled, and where the cluster's numbers come from."""
    training = (
        f"micro-batch {args.micro_batch} x {model.seq_len} tokens, accumulation {args.accum}, "
        f"{args.param_dtype} params, {args.reduce_dtype} gradient reduction, two-hop sync"
        + (f", {args.replica_reduce_dtype} replica hop" if args.replica_reduce_dtype else "")
        + (", optimizer states sharded across replicas" if args.optimizer_over_replicas else "")
        + (", model states offloaded to host memory" if args.cpu_offload else "")
        + (", activation checkpointing" if args.activation_checkpointing else "")
    )
    return "\n".join([
        f"- model: {model.num_params / 1e9:.2f}B parameters, {model.n_layer} layers, d_model {model.d_model}",
        f"- training: {training}",
        (
            f"- cluster `{cluster.name}`: {cluster.gpus_per_node} x {cluster.gpu} per node, "
            f"{cluster.hbm_gib * DEFAULT_MEMORY_FRACTION:.1f} GiB usable per GPU, "
            f"{cluster.host_gib * DEFAULT_MEMORY_FRACTION:.0f} GiB of host memory per node. {cluster.source}"
        ),
    ])


def run_plan(args: argparse.Namespace) -> None:
    """Print every candidate partition size and the recommendation, as markdown."""
    name, model = model_from_args(args)
    cluster = cluster_from_args(args)
    shape = (args.micro_batch, args.accum, args.activation_checkpointing)
    candidates = plan(model, cluster, args.nodes, *shape, options_from_args(args))
    best = recommend(candidates)
    print(f"# torchmics plan: {name} on {args.nodes} x {cluster.gpus_per_node} GPUs\n")
    print(setting(args, model, cluster) + "\n")
    print(render_table(candidates, highlight=best) + "\n")
    print(f"**Recommendation: {best.label}** (partition size {best.partition_size}): {explain(candidates, best)}")
    print("\n" + failure_line(args, args.nodes * cluster.gpus_per_node, best.partition_size, best.cost.total))


def run_simulate(args: argparse.Namespace) -> None:
    """Write the weak-scaling table, JSONL and chart to ``--out``, and print the table."""
    name, model = model_from_args(args)
    cluster = cluster_from_args(args)
    sizes = args.gpus or default_sizes(cluster.gpus_per_node, args.max_gpus)
    if not sizes:  # simulate() would take an empty list for its default, up to 1024 GPUs
        raise ValueError(f"--max-gpus {args.max_gpus} is below the smallest size simulated on {cluster.name}, "
                         f"{smallest_default_size(cluster.gpus_per_node)} GPUs; raise it, or list sizes with --gpus")
    out = Path(args.out or f"benchmarks/simulate/{cluster.name}-{name}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder (or not exist yet)")
    rows = simulate(model, cluster, args.micro_batch, args.accum, args.activation_checkpointing, sizes,
                    options_from_args(args))
    title = f"Weak scaling of {name} on {cluster.name} (cost model)"
    notes = setting(args, model, cluster)
    paths = write_outputs(rows, out, title, notes)
    print(f"# {title}\n\n{notes}\n\n{render_rows(rows)}\n")
    largest = max((r for r in rows if r.strategy == "mics"), key=lambda r: r.gpus, default=None)
    if largest is not None:
        step_s = args.micro_batch * args.accum * model.seq_len / largest.tokens_per_s_per_gpu
        print(f"At {largest.gpus} GPUs ({largest.label}): " + failure_line(args, largest.gpus, largest.partition_size, step_s) + "\n")
    print(f"wrote {', '.join(str(p) for p in paths)}")
