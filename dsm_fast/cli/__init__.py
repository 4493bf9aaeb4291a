"""The ``dsm-fast`` console script (also ``python -m dsm_fast``): a dispatcher over one module per subcommand.

Each module of this package defines ``COMMANDS = {name: (add_parser, run)}``. Argument definitions are light (no
torch import) so ``--help`` is instant; each ``run`` imports what it needs. A user mistake ends in one line on stderr
and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..config import ConfigError
from .common import Formatter, check_writable_folder, examples

MODULES = ("train", "eval", "plots", "bench", "profile", "data", "normalization", "dimensionality", "sample",
           "denoise", "atlas", "generalization", "import_release", "restore", "score")
COMMANDS = {name: command for module in MODULES
            for name, command in importlib.import_module(f".{module}", __name__).COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsm-fast", formatter_class=Formatter,
                                     description="Train and evaluate normalized energy models of images by dual "
                                                 "score matching.", epilog=examples(
                                                     "dsm-fast train --model small --steps 300 --batch-size 16",
                                                     "dsm-fast eval runs/default", "dsm-fast bench --preset paper"))
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # the deepspeed launcher puts it before the subcommand
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..checkpoint import CheckpointError
    from ..data.images import DataError

    try:
        # the output paths before the work, without creating anything: a folder that cannot be made fails at once
        # (every --json is a file; an analysis' --out a folder)
        if getattr(args, "json", None):
            check_writable_folder(Path(args.json).parent, "--json", args.json)
        if getattr(args, "out_is_folder", False):
            check_writable_folder(args.out, "--out")
        return COMMANDS[args.command][1](args)
    except (ConfigError, DataError, CheckpointError) as error:
        parser.exit(2, f"dsm-fast {args.command}: error: {error}\n")
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM during training (train.Interrupted): 128 + signal
        parser.exit(128 + getattr(error, "signal_number", 2), f"dsm-fast {args.command}: {error or 'interrupted'}\n")
    except Exception as error:
        from ..distributed import DistributedError
        from ..train import TrainingStopped

        if isinstance(error, (TrainingStopped, DistributedError)):
            parser.exit(1, f"dsm-fast {args.command}: stopped: {error}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
