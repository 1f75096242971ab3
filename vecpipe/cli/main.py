"""The ``vecpipe`` command: one subcommand per job, one configuration for all of them.

Configuration comes from ``--config FILE`` (or VECPIPE_CONFIG), then ``VECPIPE_*`` variables,
then flags. Every error vecpipe raises on purpose is a :class:`~vecpipe.errors.VecpipeError`:
``main`` catches it once and prints its sentence, exit status 2, never a traceback.

Building the parser imports the command modules and nothing heavier: each handler loads the
client libraries it needs when it runs, so ``vecpipe --help`` starts in a blink.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from vecpipe.cli import (
    audit,
    bench,
    dlq,
    index,
    migrate,
    plan,
    produce,
    search,
    serve,
    services,
    status,
    work,
)
from vecpipe.errors import VecpipeError

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]

# In the order ``vecpipe --help`` lists them.
_COMMANDS = (services, migrate, produce, work, search, serve, status, dlq, index, plan, audit,
             bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vecpipe",
        description="Streaming ingestion from Kafka into PostgreSQL + pgvector.",
    )
    parser.add_argument("--config", help="TOML configuration file (VECPIPE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vecpipe`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except VecpipeError as exc:
        print(f"vecpipe {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
