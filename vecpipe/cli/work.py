"""``vecpipe embed`` and ``vecpipe write``: run a stage's worker until stopped or idle."""

from __future__ import annotations

import argparse
from typing import Any

from vecpipe.cli.common import (
    add_db_flags,
    add_kafka_flags,
    add_model_flags,
    add_worker_flags,
    config_from_args,
)

__all__ = ["register"]


def cmd_embed(args: argparse.Namespace) -> int:
    """Run the embedding worker; its exit status is the process's."""
    from workers.run import run_embed

    cfg = config_from_args(args, embed={"batch_size": args.batch_size})
    return run_embed(cfg, until_idle_s=args.until_idle)


def cmd_write(args: argparse.Namespace) -> int:
    """Run the writer worker; its exit status is the process's."""
    from workers.run import run_write

    cfg = config_from_args(args, write={"batch_size": args.batch_size})
    return run_write(cfg, until_idle_s=args.until_idle)


def register(sub: Any) -> None:
    """Add ``vecpipe embed`` and ``vecpipe write``."""
    p = sub.add_parser("embed", help="run the embedding worker")
    add_kafka_flags(p)
    add_db_flags(p)
    add_model_flags(p)
    add_worker_flags(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("write", help="run the writer worker")
    add_kafka_flags(p)
    add_db_flags(p)
    add_worker_flags(p)
    p.set_defaults(func=cmd_write)
