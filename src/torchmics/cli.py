"""The `torchmics` command: train | bench | plan | simulate | export | prepare-data."""

from __future__ import annotations

import argparse
import sys

from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from torchmics import checkpoint_command
from torchmics.bench import command as bench_command
from torchmics.data import command as data_command
from torchmics.plan import command as plan_command
from torchmics.train import command as train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchmics", description="MiCS sharded data parallelism for PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    train_command.add_parser(subparsers)
    bench_command.add_parser(subparsers)
    plan_command.add_parser(subparsers)
    checkpoint_command.add_export_parser(subparsers)
    data_command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # ImportError: an optional package is missing
        print(f"torchmics {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ProcessRaisedException as err:
        print(f"torchmics {args.command}: a worker failed; its traceback:\n{err}", file=sys.stderr)
        return 1
    except ProcessExitedException as err:  # a worker died without a Python exception (a signal, os._exit)
        print(f"torchmics {args.command}: {err}; the other workers were stopped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
