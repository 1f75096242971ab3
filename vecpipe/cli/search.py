"""``vecpipe search``: the k nearest chunks of one tenant, from the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from vecpipe.cli.common import add_db_flags, add_model_flags, config_from_args
from vecpipe.config import STRATEGIES
from vecpipe.errors import CommandError

__all__ = ["register"]


def cmd_search(args: argparse.Namespace) -> int:
    """Embed the query, search, print the hits."""
    from vecpipe.db.pool import make_pool, search_database
    from vecpipe.db.search import Searcher, SearchPolicy
    from vecpipe.model import Encoder

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
    pool = make_pool(search_database(cfg.database), name="vecpipe-search")
    try:
        searcher = Searcher(cfg, pool, encoder, policy)
        if args.explain:
            print(searcher.explain(args.query, args.k, cfg.produce.tenant, filters=filters,
                                   ef_search=args.ef_search, strategy=args.strategy))
            return 0
        result = searcher.query(args.query, args.k, cfg.produce.tenant, filters=filters,
                                ef_search=args.ef_search, strategy=args.strategy)
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


def register(sub: Any) -> None:
    """Add ``vecpipe search``."""
    p = sub.add_parser("search", help="search the chunks of a tenant")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--tenant")
    p.add_argument("--filter", help="metadata filter, a JSON object matched with @>")
    p.add_argument("--ef-search", type=int, help="HNSW ef_search (default: scaled to the "
                   "share of rows the tenant and filters select)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="how to find the rows (default: chosen per query by row counts)")
    p.add_argument("--exact-max-rows", type=int,
                   help="matching rows up to which auto uses an exact scan (default 5000)")
    p.add_argument("--explain", action="store_true", help="print EXPLAIN (ANALYZE, BUFFERS)")
    p.add_argument("--json", action="store_true")
    add_db_flags(p)
    add_model_flags(p)
    p.set_defaults(func=cmd_search)
