"""``vecpipe produce``, ``vecpipe delete`` and ``vecpipe demo-corpus``: the upstream side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vecpipe.cli.common import add_kafka_flags, config_from_args
from vecpipe.config import CHUNKERS
from vecpipe.errors import CommandError

__all__ = ["register"]


def cmd_produce(args: argparse.Namespace) -> int:
    """Chunk and publish files, directories, JSONL or stdin."""
    from producers.produce import produce

    cfg = config_from_args(args, produce={"chunker": args.chunker, "chunk_size": args.chunk_size,
                                          "chunk_overlap": args.chunk_overlap})
    return produce(cfg, args.paths, include=args.include or ["*"], exclude=args.exclude or [],
                   dry_run=args.dry_run, progress=not args.quiet)


def cmd_delete(args: argparse.Namespace) -> int:
    """Publish the deletion of a document or of a whole tenant."""
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
    """Write the standard library's docstrings as documents."""
    from producers.demo_corpus import write_demo_corpus

    n = write_demo_corpus(Path(args.dir), limit=args.limit)
    print(f"wrote {n} documents to {args.dir}")
    return 0


def register(sub: Any) -> None:
    """Add ``vecpipe produce``, ``vecpipe delete`` and ``vecpipe demo-corpus``."""
    p = sub.add_parser("produce", help="chunk files, directories or JSONL and publish them")
    p.add_argument("paths", nargs="+", help="files, directories, or - for JSONL on stdin")
    add_kafka_flags(p)
    p.add_argument("--tenant", help="tenant of the documents (VECPIPE_TENANT)")
    p.add_argument("--model", help="model whose tokenizer sizes the chunks")
    p.add_argument("--include", action="append", help="glob of files to take (repeatable)")
    p.add_argument("--exclude", action="append", help="glob of files to skip (repeatable)")
    p.add_argument("--chunker", choices=CHUNKERS)
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
