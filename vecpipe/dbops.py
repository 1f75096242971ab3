"""``vecpipe index``, ``vecpipe plan`` and ``vecpipe audit``: the database operator's commands."""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

__all__ = ["AuditEntry", "audit_trail", "lineage", "parse_when", "register"]

Handler = Callable[[argparse.Namespace], int]


def _sentences(fn: Handler) -> Handler:
    """Report index and plan errors as the CLI reports its own: one sentence, exit status 2."""
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from vecpipe.cli import CommandError
        from vecpipe.indexes import IndexOperationError
        from vecpipe.plan import PlanError

        try:
            return fn(args)
        except (IndexOperationError, PlanError) as exc:
            raise CommandError(str(exc)) from None
    return run


def _user_error(message: str) -> Exception:
    from vecpipe.cli import CommandError

    return CommandError(message)


# -- index ---------------------------------------------------------------------------------------

@_sentences
def cmd_index(args: argparse.Namespace) -> int:
    """Create, build, rebuild, drop a vector index, or show the statistics of all of them."""
    from vecpipe import indexes
    from vecpipe.cli import config_from_args

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
        raise _user_error(f"--name is for rebuild and drop; {args.action} names the index from "
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
    from vecpipe.plan import format_bytes

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


# -- plan ----------------------------------------------------------------------------------------

@_sentences
def cmd_plan(args: argparse.Namespace) -> int:
    """Print the storage estimate for a chunks table of ``--rows`` rows."""
    from vecpipe.cli import config_from_args
    from vecpipe.plan import Workload, estimate

    v = config_from_args(args).vector
    index = args.index or v.index
    work = Workload(
        rows=args.rows, dimension=args.dim or v.dimension, column_type=args.type or v.column_type,
        index=index, m=args.m or v.hnsw_m, lists=args.lists or v.ivfflat_lists,
        text_bytes=args.text_bytes, text_compression=args.text_compression,
        tenant_bytes=args.tenant_bytes, doc_id_bytes=args.doc_id_bytes,
        metadata_bytes=args.metadata_bytes, metadata_values=args.metadata_values,
        btree_fill=args.btree_fill,
    )
    est = estimate(work)
    if args.json:
        out = {k: v for k, v in asdict(est).items() if k != "workload"}
        out.update(workload=asdict(work), indexes_bytes=est.indexes_bytes,
                   table_bytes=est.table_bytes, total_bytes=est.total_bytes)
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(est.report()))
    return 0


# -- audit ---------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO date or time ('2025-01-31', '2025-01-31T12:00:00+02:00') or an age ('7d', '12h')."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _user_error(
            f"{text!r} is neither an ISO date or time (2025-01-31, 2025-01-31T12:00:00Z) nor "
            "an age like 30m, 12h, 7d or 2w."
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


AuditEntry = dict[str, Any]


def audit_trail(cfg: Any, *, tenant: str | None = None, since: datetime | None = None,
                until: datetime | None = None, action: str | None = None,
                limit: int = 1000) -> list[AuditEntry]:
    """Deletions recorded in audit_log, oldest first, with the message that asked for each."""
    from vecpipe.db import connect

    where: list[sql.Composable] = [sql.SQL("true")]
    params: dict[str, Any] = {"limit": limit}
    for column, op, key, value in (("tenant_id", "=", "tenant", tenant),
                                   ("at", ">=", "since", since), ("at", "<", "until", until),
                                   ("action", "=", "action", action)):
        if value is not None:
            where.append(sql.SQL("{} {} {}").format(
                sql.Identifier(column), sql.SQL(op), sql.Placeholder(key)))
            params[key] = value
    query = sql.SQL(
        "SELECT id, at, action, tenant_id, doc_id, doc_version, rows_deleted, applied, source"
        " FROM {}.audit_log WHERE {} ORDER BY at, id LIMIT %(limit)s"
    ).format(sql.Identifier(cfg.database.schema), sql.SQL(" AND ").join(where))
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def lineage(cfg: Any, *, tenant: str | None = None) -> list[AuditEntry]:
    """Which model (name, revision, backend) embedded how many chunks of each tenant, and when."""
    from vecpipe.db import connect

    where = sql.SQL("WHERE tenant_id = %(tenant)s") if tenant else sql.SQL("")
    query = sql.SQL(
        "SELECT tenant_id, model_name, model_revision, model_backend, count(*) AS chunks,"
        " min(embedded_at) AS first_embedded, max(embedded_at) AS last_embedded"
        " FROM {}.chunks {} GROUP BY 1, 2, 3, 4 ORDER BY 1, 6"
    ).format(sql.Identifier(cfg.database.schema), where)
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        cur = conn.execute(query, {"tenant": tenant})
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@_sentences
def cmd_audit(args: argparse.Namespace) -> int:
    """Print the deletion trail (or, with --lineage, the model lineage of stored chunks)."""
    from vecpipe.cli import config_from_args

    cfg = config_from_args(args)
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until) if args.until else None
    if since and until and since >= until:
        raise _user_error(f"--since {args.since!r} is not before --until {args.until!r}; "
                         "nothing can match.")
    if args.lineage:
        rows = lineage(cfg, tenant=args.audit_tenant)
    else:
        rows = audit_trail(cfg, tenant=args.audit_tenant, since=since, until=until,
                           action=args.action, limit=args.limit)
    if args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
        return 0
    if args.lineage:
        print(f"{'tenant':<20} {'model':<28} {'revision':<14} {'backend':<12} {'chunks':>8}  "
              "embedded")
        for r in rows:
            print(f"{r['tenant_id']:<20} {r['model_name']:<28} {r['model_revision'][:12]:<14} "
                  f"{r['model_backend']:<12} {r['chunks']:>8}  {_ts(r['first_embedded'])} .. "
                  f"{_ts(r['last_embedded'])}")
        return 0
    print(f"{'at':<20} {'action':<16} {'tenant':<16} {'document':<24} {'version':>7} "
          f"{'rows':>6} {'applied':<7} source")
    for r in rows:
        src = r["source"] or {}
        origin = (f"{src.get('topic', '?')}[{src.get('partition', '?')}]@"
                  f"{src.get('offset', '?')}")
        extra = " ".join(f"{k}={src[k]}" for k in ("worker", "reason", "requested_at")
                         if src.get(k))
        print(f"{_ts(r['at']):<20} {r['action']:<16} {r['tenant_id']:<16} "
              f"{r['doc_id'] or '(whole tenant)':<24} {r['doc_version'] or '':>7} "
              f"{r['rows_deleted']:>6} {'yes' if r['applied'] else 'no':<7} {origin} "
              f"{extra}".rstrip())
    if len(rows) == args.limit:
        print(f"(first {args.limit} entries; --limit shows more)")
    return 0


def _ts(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# -- parsers -------------------------------------------------------------------------------------

def register(sub: Any) -> None:
    """Add ``vecpipe index``, ``vecpipe plan`` and ``vecpipe audit``."""
    from vecpipe.cli import add_db_flags

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

    p = sub.add_parser("plan", help="estimate the disk a chunks table and its indexes take")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--dim", type=int, help="dimensions (default: VECPIPE_DIMENSION)")
    p.add_argument("--type", choices=["vector", "halfvec"])
    p.add_argument("--index", choices=["hnsw", "ivfflat", "none"])
    p.add_argument("--m", type=int)
    p.add_argument("--lists", type=int)
    p.add_argument("--text-bytes", type=int, default=800, help="bytes of text a chunk")
    p.add_argument("--text-compression", type=float, default=1.0,
                   help="compressed/raw size of the text under pglz (1: incompressible)")
    p.add_argument("--tenant-bytes", type=int, default=8)
    p.add_argument("--doc-id-bytes", type=int, default=24)
    p.add_argument("--metadata-bytes", type=int, default=32,
                   help="pg_column_size of the metadata jsonb")
    p.add_argument("--metadata-values", type=int, default=2,
                   help="scalar values in the metadata (GIN entries a row)")
    p.add_argument("--btree-fill", type=float, default=0.7,
                   help="B-tree leaf fill: 0.7 for random inserts, 0.9 after REINDEX")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("audit", help="the deletion trail (GDPR/CCPA), or model lineage")
    p.add_argument("--tenant", dest="audit_tenant", metavar="TENANT")
    p.add_argument("--since", help="ISO date/time or age (30m, 12h, 7d)")
    p.add_argument("--until", help="ISO date/time or age")
    p.add_argument("--action", choices=["delete_document", "delete_tenant"])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--lineage", action="store_true",
                   help="instead: chunks per tenant and model (name, revision, backend)")
    p.add_argument("--json", action="store_true")
    add_db_flags(p)
    p.set_defaults(func=cmd_audit)
