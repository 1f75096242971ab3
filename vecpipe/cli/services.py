"""``vecpipe services up|down|status``: the local Kafka and PostgreSQL, without Docker."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vecpipe.cli.common import home_of
from vecpipe.config import LOCAL_HOME, OpsConfig

__all__ = ["register"]


def cmd_services(args: argparse.Namespace) -> int:
    """Start, stop or show the local services; exit 1 when one of them is not running."""
    from vecpipe import devservices

    home = home_of(args)
    if args.action == "up":
        info = devservices.up(home, kafka_port=args.kafka_port, postgres_port=args.postgres_port,
                              progress=lambda line: print(line, file=sys.stderr),
                              pgbouncer=args.pgbouncer, pgbouncer_port=args.pgbouncer_port,
                              replica=args.replica, replica_port=args.replica_port)
    elif args.action == "down":
        devservices.down(home, purge=args.purge)
        print(f"services stopped{' and data removed' if args.purge else ''} ({home})")
        return 0
    else:
        info = devservices.status(home)
    print(f"kafka     {'running' if info.kafka_running else 'stopped'}  "
          f"VECPIPE_KAFKA_BOOTSTRAP={info.bootstrap}")
    print(f"postgres  {'running' if info.postgres_running else 'stopped'}  "
          f"VECPIPE_DATABASE_URL={info.database_url}")
    # Behind PgBouncer, database.url is the pooler and direct_url the server itself.
    pooled = {"VECPIPE_DATABASE_URL": info.pooled_url, "VECPIPE_DATABASE_PROXY": "transaction",
              "VECPIPE_DATABASE_DIRECT_URL": info.database_url} if info.pooled_url else {}
    if info.pooled_url:
        print(f"pgbouncer running  VECPIPE_DATABASE_URL={info.pooled_url} (transaction pooling)")
    if info.replica_url:
        print(f"replica   running  VECPIPE_SEARCH_DATABASE_URL={info.replica_url}")
    if args.action == "status" and args.env:
        print(f"export VECPIPE_KAFKA_BOOTSTRAP={info.bootstrap}")
        for name, value in (pooled or {"VECPIPE_DATABASE_URL": info.database_url}).items():
            print(f"export {name}={value}")
        if info.replica_url:
            print(f"export VECPIPE_SEARCH_DATABASE_URL={info.replica_url}")
    if args.action == "up":
        print(reach(info.home), file=sys.stderr)
    return 0 if info.kafka_running and info.postgres_running else 1


def reach(home: Path) -> str:
    """Say which other commands find the services of ``home`` without any address set."""
    if home == Path(OpsConfig.home).expanduser().resolve():
        return "Other vecpipe commands find these services by themselves."
    if home.name == LOCAL_HOME:
        return (f"vecpipe commands run in {home.parent} (or below it) find these services by "
                f"themselves; elsewhere, set VECPIPE_HOME={home}.")
    return f"Other vecpipe commands find these services with VECPIPE_HOME={home}."


def register(sub: Any) -> None:
    """Add ``vecpipe services``."""
    p = sub.add_parser("services", help="start, stop or show the local Kafka and PostgreSQL")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", help="where services keep their data (VECPIPE_HOME)")
    p.add_argument("--purge", action="store_true", help="with down: remove their data too")
    p.add_argument("--env", action="store_true", help="with status: print export lines")
    p.add_argument("--kafka-port", type=int, help="with up: the broker's port (default 9092)")
    p.add_argument("--postgres-port", type=int, help="with up: PostgreSQL's port (default 5432)")
    p.add_argument("--pgbouncer", action="store_true",
                   help="with up: also PgBouncer in transaction pooling mode (Debian's package)")
    p.add_argument("--pgbouncer-port", type=int, help="with up: PgBouncer's port (default 6432)")
    p.add_argument("--replica", action="store_true",
                   help="with up: also a hot standby streaming from the server (pg_basebackup)")
    p.add_argument("--replica-port", type=int, help="with up: the replica's port (default 5433)")
    p.set_defaults(func=cmd_services)
