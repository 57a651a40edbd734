"""The ``rsscene`` command line: argument parsing only, one function per subcommand.

The subcommands live by family (:mod:`.data`, :mod:`.training`, :mod:`.checkpoints`,
:mod:`.serving`) over the flags and types they share (:mod:`.args`). Each ``cmd_*`` function
turns parsed arguments into a call to the library; a user's mistake
(:class:`rsscene.errors.UserError`) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from rsscene import __version__
from rsscene.cli.args import RUN_FLAGS
from rsscene.cli.checkpoints import add_cam, add_evaluate, add_export, add_map, add_predict
from rsscene.cli.data import add_info, add_prepare, add_synth
from rsscene.cli.serving import add_serve
from rsscene.cli.training import add_bench, add_demo, add_train
from rsscene.errors import UserError
from rsscene.serve.hosts import LOOPBACK, served_host_names

__all__ = [
    "COMMANDS",
    "LOOPBACK",
    "RUN_FLAGS",
    "Parser",
    "build_parser",
    "main",
    "served_host_names",
]

# The order `rsscene --help` lists the commands in.
COMMANDS = [
    add_info,
    add_synth,
    add_prepare,
    add_train,
    add_bench,
    add_evaluate,
    add_predict,
    add_demo,
    add_cam,
    add_map,
    add_export,
    add_serve,
]


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error; the usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rsscene",
        description="Train, evaluate and serve ResNet classifiers for remote-sensing scenes.",
    )
    parser.add_argument("--version", action="version", version=f"rsscene {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback for any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"rsscene {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Disk full, permission denied, read-only disk: the machine's state, not a bug in
        # rsscene. An OSError without errno is raised by code, so it keeps its traceback.
        if args.debug or e.errno is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"rsscene {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"rsscene {args.command}: interrupted", file=sys.stderr)
        return 130
