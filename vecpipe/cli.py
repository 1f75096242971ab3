"""The ``vecpipe`` command: one subcommand per job, one configuration for all of them.

Configuration comes from ``--config FILE`` (or VECPIPE_CONFIG), then ``VECPIPE_*`` variables,
then flags. A wrong setting or an unreachable service ends the command with one sentence on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vecpipe.config import Config, ConfigError, Unreachable, load_config

__all__ = [
    "CommandError",
    "add_db_flags",
    "add_kafka_flags",
    "add_model_flags",
    "add_worker_flags",
    "build_parser",
    "config_from_args",
    "main",
]

EXIT_USAGE = 2


class CommandError(RuntimeError):
    """A command cannot go on; the message says why in one sentence."""


Handler = Callable[[argparse.Namespace], int]


def _home(args: argparse.Namespace, cfg: Config | None = None) -> Path:
    if getattr(args, "home", None):
        return Path(args.home)
    return Path((cfg or load_config()).ops.home)


def config_from_args(args: argparse.Namespace, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in sections.items()}
    for flag, (section, name) in _COMMON_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[name] = value
    return load_config(overrides, config_file=args.config)


# Flags that several commands share: argparse dest -> (section, setting).
_COMMON_FLAGS = {
    "bootstrap": ("kafka", "bootstrap"),
    "database_url": ("database", "url"),
    "schema": ("database", "schema"),
    "tenant": ("produce", "tenant"),
    "model": ("model", "name"),
    "device": ("model", "device"),
    "backend": ("model", "backend"),
    "precision": ("model", "precision"),
    "metrics_port": ("ops", "metrics_port"),
    "log_format": ("ops", "log_format"),
}


def add_kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (VECPIPE_KAFKA_BOOTSTRAP)")


def add_db_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="PostgreSQL URL (VECPIPE_DATABASE_URL)")
    p.add_argument("--schema", help="database schema (VECPIPE_DB_SCHEMA)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="sentence-transformers model folder or name (VECPIPE_MODEL)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps", "auto"])
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"])
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until-idle", type=float, metavar="SECONDS",
                   help="exit 0 once nothing has arrived for this long")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz here")
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument("--batch-size", type=int)


# -- services ---------------------------------------------------------------------------------

def cmd_services(args: argparse.Namespace) -> int:
    from vecpipe import services

    home = _home(args)
    try:
        if args.action == "up":
            info = services.up(home, kafka_port=args.kafka_port, postgres_port=args.postgres_port,
                               progress=lambda line: print(line, file=sys.stderr))
        elif args.action == "down":
            services.down(home, purge=args.purge)
            print(f"services stopped{' and data removed' if args.purge else ''} ({home})")
            return 0
        else:
            info = services.status(home)
    except services.ServiceError as exc:
        raise CommandError(str(exc)) from None
    print(f"kafka     {'running' if info.kafka_running else 'stopped'}  "
          f"VECPIPE_KAFKA_BOOTSTRAP={info.bootstrap}")
    print(f"postgres  {'running' if info.postgres_running else 'stopped'}  "
          f"VECPIPE_DATABASE_URL={info.database_url}")
    if args.action == "status" and args.env:
        print(f"export VECPIPE_KAFKA_BOOTSTRAP={info.bootstrap}")
        print(f"export VECPIPE_DATABASE_URL={info.database_url}")
    return 0 if info.kafka_running and info.postgres_running else 1


# -- database -----------------------------------------------------------------------------------

def cmd_migrate(args: argparse.Namespace) -> int:
    from vecpipe.migrate import migrate

    cfg = config_from_args(args)
    applied = migrate(cfg, with_index=not args.no_index)
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    if not args.no_index and cfg.vector.index != "none":
        from vecpipe.migrate import index_name

        print(f"vector index: {index_name(cfg)} ({cfg.vector.index}, {cfg.vector.metric})")
    return 0


# -- producing ----------------------------------------------------------------------------------

def cmd_produce(args: argparse.Namespace) -> int:
    from producers.cli import produce

    cfg = config_from_args(args, produce={"chunker": args.chunker, "chunk_size": args.chunk_size,
                                 "chunk_overlap": args.chunk_overlap})
    return produce(cfg, args.paths, include=args.include or ["*"], exclude=args.exclude or [],
                   dry_run=args.dry_run, progress=not args.quiet)


def cmd_delete(args: argparse.Namespace) -> int:
    from producers.publisher import Publisher

    cfg = config_from_args(args)
    if "/" in args.tenant:
        raise CommandError(f"tenant {args.tenant!r} contains '/', which tenant ids cannot.")
    with Publisher(cfg, chunker=lambda doc: []) as pub:
        if args.doc_id:
            pub.delete(args.tenant, args.doc_id, version=args.version, reason=args.reason)
        else:
            pub.delete_tenant(args.tenant, reason=args.reason)
    what = f"document {args.doc_id!r} of tenant" if args.doc_id else "every chunk of tenant"
    print(f"delete of {what} {args.tenant!r} published to {cfg.kafka.chunks_topic}; the "
          "workers apply it in order and record it in the audit log (vecpipe audit).")
    return 0


def cmd_demo_corpus(args: argparse.Namespace) -> int:
    from producers.demo_corpus import write_demo_corpus

    n = write_demo_corpus(Path(args.dir), limit=args.limit)
    print(f"wrote {n} documents to {args.dir}")
    return 0


# -- workers ------------------------------------------------------------------------------------

def cmd_embed(args: argparse.Namespace) -> int:
    from workers.run import run_embed

    cfg = config_from_args(args, embed={"batch_size": args.batch_size})
    return run_embed(cfg, until_idle_s=args.until_idle)


def cmd_write(args: argparse.Namespace) -> int:
    from workers.run import run_write

    cfg = config_from_args(args, write={"batch_size": args.batch_size})
    return run_write(cfg, until_idle_s=args.until_idle)


# -- search ---------------------------------------------------------------------------------------

def cmd_search(args: argparse.Namespace) -> int:
    from vecpipe.db import make_pool
    from vecpipe.model import Encoder
    from vecpipe.search import Searcher, SearchError, SearchPolicy

    cfg = config_from_args(args)
    try:
        filters = json.loads(args.filter) if args.filter else None
    except json.JSONDecodeError:
        filters = []  # reported below, with the example
    if filters is not None and not isinstance(filters, dict):
        raise CommandError("--filter must be a JSON object, e.g. '{\"lang\": \"en\"}'.")
    if args.k < 1:
        raise CommandError(f"-k must be at least 1, got {args.k}.")
    policy = SearchPolicy()
    if args.exact_max_rows is not None:
        policy = SearchPolicy(exact_max_rows=args.exact_max_rows)
    # One query: a single torch thread is as fast and does not fight the database for cores.
    encoder = Encoder(replace(cfg.model, threads=cfg.model.threads or 1))
    pool = make_pool(cfg.database, name="vecpipe-search")
    try:
        searcher = Searcher(cfg, pool, encoder, policy)
        if args.explain:
            print(searcher.explain(args.query, args.k, filters=filters, ef_search=args.ef_search,
                                   strategy=args.strategy))
            return 0
        result = searcher.query(args.query, args.k, filters=filters, ef_search=args.ef_search,
                                strategy=args.strategy)
    except SearchError as exc:
        raise CommandError(str(exc)) from None
    finally:
        pool.close()
    hits = result.hits
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], ensure_ascii=False, indent=2))
        return 0
    print(f'top {len(hits)} for "{args.query}" (tenant {cfg.produce.tenant}, '
          f"{result.elapsed_ms:.0f} ms; {result.strategy.describe()})")
    for rank, h in enumerate(hits, 1):
        snippet = " ".join(h.content.split())[:100]
        print(f"{rank:>3}. {h.distance:.4f}  {h.doc_id} #{h.chunk_index}  {snippet}")
    return 0


# -- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vecpipe",
        description="Streaming ingestion from Kafka into PostgreSQL + pgvector.",
    )
    parser.add_argument("--config", help="TOML configuration file (VECPIPE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("services", help="start, stop or show the local Kafka and PostgreSQL")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", help="where services keep their data (VECPIPE_HOME)")
    p.add_argument("--purge", action="store_true", help="with down: remove their data too")
    p.add_argument("--env", action="store_true", help="with status: print export lines")
    p.add_argument("--kafka-port", type=int, help="with up: the broker's port (default 9092)")
    p.add_argument("--postgres-port", type=int, help="with up: PostgreSQL's port (default 5432)")
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("migrate", help="apply sql/ migrations and create the vector index")
    add_db_flags(p)
    p.add_argument("--no-index", action="store_true",
                   help="skip the vector index (bulk backfill: build it later)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("produce", help="chunk files, directories or JSONL and publish them")
    p.add_argument("paths", nargs="+", help="files, directories, or - for JSONL on stdin")
    add_kafka_flags(p)
    p.add_argument("--tenant", help="tenant of the documents (VECPIPE_TENANT)")
    p.add_argument("--model", help="model whose tokenizer sizes the chunks")
    p.add_argument("--include", action="append", help="glob of files to take (repeatable)")
    p.add_argument("--exclude", action="append", help="glob of files to skip (repeatable)")
    p.add_argument("--chunker", choices=["token", "recursive", "markdown"])
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--chunk-overlap", type=int)
    p.add_argument("--dry-run", action="store_true", help="print chunk statistics only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("delete", help="delete a document or a whole tenant, end to end, audited")
    p.add_argument("tenant")
    p.add_argument("doc_id", nargs="?", help="omit to delete the whole tenant")
    p.add_argument("--version", type=int, help="delete only this version and older ones")
    p.add_argument("--reason", default="", help="recorded in the audit log, e.g. a ticket id")
    add_kafka_flags(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("demo-corpus", help="write the stdlib docstrings as documents")
    p.add_argument("dir")
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_demo_corpus)

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

    p = sub.add_parser("search", help="search the chunks of a tenant")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--tenant")
    p.add_argument("--filter", help="metadata filter, a JSON object matched with @>")
    p.add_argument("--ef-search", type=int, help="HNSW ef_search (default: scaled to the "
                   "share of rows the tenant and filters select)")
    p.add_argument("--strategy", default="auto",
                   choices=["auto", "exact", "tenant_index", "shared_index"],
                   help="how to find the rows (default: chosen per query by row counts)")
    p.add_argument("--exact-max-rows", type=int,
                   help="matching rows up to which auto uses an exact scan (default 5000)")
    p.add_argument("--explain", action="store_true", help="print EXPLAIN (ANALYZE, BUFFERS)")
    p.add_argument("--json", action="store_true")
    add_db_flags(p)
    add_model_flags(p)
    p.set_defaults(func=cmd_search)

    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# Modules that add their own subcommands with ``register(subparsers)``; each handler they set
# with ``set_defaults(func=...)`` takes the parsed arguments and returns the exit status.
_COMMAND_MODULES: tuple[str, ...] = ("vecpipe.status", "workers.dlq", "vecpipe.bench",
                                     "vecpipe.dbops")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vecpipe`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except (ConfigError, Unreachable, CommandError) as exc:
        print(f"vecpipe {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from vecpipe.faults import DeliveryFailed, DeliveryRefused
        from vecpipe.migrate import MigrationError

        if isinstance(exc, DeliveryFailed | DeliveryRefused | MigrationError):
            print(f"vecpipe {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    # Run as `python -m vecpipe.cli`, this file is __main__; registered modules import
    # vecpipe.cli again, so use that copy's main, whose except clauses know their errors.
    from vecpipe.cli import main as _main

    sys.exit(_main())
