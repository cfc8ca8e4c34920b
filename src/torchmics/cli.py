"""The `torchmics` command: train | bench | plan | simulate | export | prepare-data."""

from __future__ import annotations

import argparse
import sys
import traceback

from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from torchmics import checkpoint_command
from torchmics.bench import command as bench_command
from torchmics.data import command as data_command
from torchmics.plan import command as plan_command
from torchmics.train import command as train_command
from torchmics.launch import WorkerFailed, show_warnings_as_lines

# Errors that mean "fix the input": exit status 2, and the message alone says what is wrong.
INPUT_ERRORS = (ValueError, ImportError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


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
    """Run one command; any failure is one line on stderr (``--debug``: the full traceback first).

    Exit status 2: bad input (ImportError: an optional package is missing); 1: anything else,
    including a failed worker, whose line is the exception it raised.
    """
    args = build_parser().parse_args(argv)
    prog, debug = f"torchmics {args.command}", getattr(args, "debug", False)
    show_warnings_as_lines(prog, debug)
    try:
        args.run(args)
    except ProcessRaisedException as err:  # a command without a run folder to keep the traceback in
        return _fail(prog, WorkerFailed(err.error_index, err.msg, None), debug)
    except Exception as err:
        return _fail(prog, err, debug)
    return 0


def _fail(prog: str, err: Exception, debug: bool) -> int:
    if debug:
        print(err.traceback if isinstance(err, WorkerFailed) else traceback.format_exc(), file=sys.stderr, end="")
    print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
    return 2 if isinstance(err, INPUT_ERRORS) else 1


def _one_line(err: Exception) -> str:
    if isinstance(err, ProcessExitedException):  # a worker died without a Python exception (a signal, os._exit)
        return f"{err}; the other workers were stopped"
    message = " ".join(str(err).split())
    return message if isinstance(err, INPUT_ERRORS + (WorkerFailed,)) else f"{type(err).__name__}: {message}"


if __name__ == "__main__":
    sys.exit(main())
