"""`torchmics export`: full weights from a sharded checkpoint, in one process, without the cluster."""

from __future__ import annotations

import argparse
import os

from torchmics.export import WEIGHTS_FILE, export_checkpoint


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a sharded checkpoint's full model weights as safetensors",
        description="Read every shard of checkpoint CKPT (a step_<N> directory written by `torchmics train "
        "--checkpoint-every` or torchmics.save_checkpoint) and write the full model weights, keyed like the "
        "unwrapped model's state_dict(); the optimizer state is left out. Needs no GPUs and no process group.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, e.g. runs/x/step_1000")
    parser.add_argument(
        "--to",
        required=True,
        help="a .safetensors file, or a directory that gets model.safetensors (and config.json for Hugging Face models)",
    )
    parser.add_argument(
        "--hf-config",
        default=None,
        metavar="CONFIG",
        help="config.json (or its folder) to write into the --to folder; default: the one saved with the checkpoint",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error, not one line")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    export_checkpoint(args.checkpoint, args.to, hf_config=args.hf_config)
    written = args.to if args.to.endswith(".safetensors") else os.path.join(args.to, WEIGHTS_FILE)
    print(f"wrote {written} ({os.path.getsize(written) / 2**20:.1f} MiB) from {args.checkpoint}")
