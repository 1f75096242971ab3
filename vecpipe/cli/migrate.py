"""``vecpipe migrate``: apply the sql/ migrations and create the vector index."""

from __future__ import annotations

import argparse
from typing import Any

from vecpipe.cli.common import add_db_flags, config_from_args

__all__ = ["register"]


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply what is missing; print what was applied and the vector index."""
    from vecpipe.db.indexes import index_name
    from vecpipe.db.migrate import migrate

    cfg = config_from_args(args)
    applied = migrate(cfg, with_index=not args.no_index)
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    if not args.no_index and cfg.vector.index != "none":
        print(f"vector index: {index_name(cfg)} ({cfg.vector.index}, {cfg.vector.metric})")
    return 0


def register(sub: Any) -> None:
    """Add ``vecpipe migrate``."""
    p = sub.add_parser("migrate", help="apply sql/ migrations and create the vector index")
    add_db_flags(p)
    p.add_argument("--no-index", action="store_true",
                   help="skip the vector index (bulk backfill: build it later)")
    p.set_defaults(func=cmd_migrate)
