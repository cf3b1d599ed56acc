"""The ``densenet`` command line: one sub-command per module (parse, call one task, print), each
with ``--help``.

Expected errors (the package's own, a file that cannot be read, a bad value) are reported as one
line on stderr, ``densenet COMMAND: error: ...`` like argparse's own (exit status 2;
``DENSENET_DEBUG=1`` shows the traceback); anything else is a bug and keeps its traceback.
Every ``--help`` shows the options' defaults.

A command module imports what runs the command inside its ``run`` (the names its options offer
come from ``densenet.choices``), so that ``--help`` and ``info`` answer without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from densenet import __version__
from densenet.cli import (
    bench,
    calibrate,
    embed,
    evaluate,
    export,
    info,
    predict,
    quantize,
    serve,
    train,
    weights,
)
from densenet.cli.common import CommandParser, print_problem
from densenet.errors import DenseNetError, first_line

COMMANDS = (
    predict,
    embed,
    info,
    weights,
    serve,
    export,
    evaluate,
    calibrate,
    train,
    bench,
    quantize,
)
EXPECTED_ERRORS = (DenseNetError, OSError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenet",
        description="Dense Convolutional Networks: classify, embed, evaluate, train, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("densenet: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        if os.environ.get("DENSENET_DEBUG", "") not in ("", "0"):
            raise
        print_problem(args, "error", first_line(error))
        return 2
