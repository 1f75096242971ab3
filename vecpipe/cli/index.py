"""``vecpipe index``: create, build, rebuild and drop vector indexes, and their statistics."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime
from typing import Any

from vecpipe.cli.common import add_db_flags, config_from_args
from vecpipe.errors import CommandError

__all__ = ["register"]


def cmd_index(args: argparse.Namespace) -> int:
    """Create, build, rebuild, drop a vector index, or show the statistics of all of them."""
    from vecpipe.db import indexes

    cfg = config_from_args(
        args,
        vector={"index": args.method, "hnsw_m": args.m,
                "hnsw_ef_construction": args.ef_construction, "ivfflat_lists": args.lists},
        database={"maintenance_work_mem": args.maintenance_work_mem,
                  "max_parallel_maintenance_workers": args.parallel_workers},
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    tenant, name = args.index_tenant, args.name
    if args.action in ("create", "build") and name:
        raise CommandError(f"--name is for rebuild and drop; {args.action} names the index from "
                         "the configuration (and --tenant).")
    if args.action == "stats":
        return _print_stats(indexes.stats(cfg), as_json=args.json)
    if args.action == "drop":
        target = indexes.target_name(cfg, tenant, name)
        dropped = indexes.drop(cfg, tenant=tenant, name=name)
        print(f"dropped {target}" if dropped else f"no index {target}; nothing to drop")
        return 0
    interval = args.progress_interval
    if args.action == "create":
        result = indexes.create(cfg, tenant=tenant, progress=progress, interval=interval)
    elif args.action == "build":
        result = indexes.build(cfg, tenant=tenant, progress=progress, interval=interval)
    else:
        result = indexes.rebuild(cfg, tenant=tenant, name=name, progress=progress,
                                 interval=interval)
    if result.action == "exists":
        print(f"{result.name} exists and is valid; nothing to do")
    else:
        print(f"{result.name} {result.action} in {result.seconds:.1f} s")
    return 0


def _print_stats(st: Any, *, as_json: bool) -> int:
    from vecpipe.db.plan import format_bytes

    if as_json:
        print(json.dumps(asdict(st), default=str, indent=2))
        return 1 if any(not i.valid for i in st.indexes) else 0

    def when(*stamps: datetime | None) -> str:
        known = [s for s in stamps if s is not None]
        return max(known).strftime("%Y-%m-%d %H:%M:%S %Z") if known else "never"

    print(f"table {st.schema}.chunks ({st.column}): {st.live_tuples:,} live, "
          f"{st.dead_tuples:,} dead ({st.dead_ratio:.1%})")
    print(f"  heap {format_bytes(st.heap_bytes)}, table with TOAST {format_bytes(st.table_bytes)},"
          f" indexes {format_bytes(st.indexes_bytes)}, total {format_bytes(st.total_bytes)}")
    print(f"  last vacuum {when(st.last_vacuum, st.last_autovacuum)}, "
          f"last analyze {when(st.last_analyze, st.last_autoanalyze)}")
    for flag in st.flags:
        print(f"  ! {flag}")
    print()
    print(f"{'index':<48} {'method':<8} {'size':>10} {'/table':>7} {'expected':>10} "
          f"{'scans':>8}  valid")
    for ix in st.indexes:
        expected = format_bytes(ix.expected_bytes) if ix.expected_bytes else "-"
        print(f"{ix.name:<48} {ix.method:<8} {format_bytes(ix.size_bytes):>10} "
              f"{ix.ratio_to_table:>6.0%} {expected:>10} {ix.scans:>8}  "
              f"{'yes' if ix.valid else 'NO'}")
        if ix.predicate:
            print(f"    where {ix.predicate}")
        if ix.options:
            print(f"    with {', '.join(f'{k}={v}' for k, v in ix.options.items())}")
        for flag in ix.flags:
            print(f"    ! {flag}")
    return 1 if any(not i.valid for i in st.indexes) else 0


def register(sub: Any) -> None:
    """Add ``vecpipe index``."""
    p = sub.add_parser("index", help="create, build, rebuild, drop vector indexes; statistics")
    p.add_argument("action", choices=["create", "build", "rebuild", "drop", "stats"])
    p.add_argument("--tenant", dest="index_tenant", metavar="TENANT",
                   help="a tenant's own partial index (create, build, rebuild, drop)")
    p.add_argument("--name", help="rebuild or drop this vector index (see stats)")
    p.add_argument("--method", choices=["hnsw", "ivfflat"],
                   help="index method (VECPIPE_VECTOR_INDEX)")
    p.add_argument("--m", type=int, help="HNSW m (VECPIPE_VECTOR_HNSW_M)")
    p.add_argument("--ef-construction", type=int,
                   help="HNSW ef_construction (VECPIPE_VECTOR_HNSW_EF_CONSTRUCTION)")
    p.add_argument("--lists", type=int, help="IVFFlat lists (VECPIPE_VECTOR_IVFFLAT_LISTS)")
    p.add_argument("--maintenance-work-mem",
                   help="e.g. 4GB (VECPIPE_DATABASE_MAINTENANCE_WORK_MEM)")
    p.add_argument("--parallel-workers", type=int,
                   help="max_parallel_maintenance_workers "
                        "(VECPIPE_DATABASE_MAX_PARALLEL_MAINTENANCE_WORKERS)")
    p.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="print build progress this often (0: never)")
    p.add_argument("--json", action="store_true", help="with stats: JSON")
    add_db_flags(p)
    p.set_defaults(func=cmd_index)
