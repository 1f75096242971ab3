"""``vecpipe audit``: the deletion trail (GDPR/CCPA), or the model lineage of stored chunks."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from vecpipe.cli.common import add_db_flags, config_from_args, parse_time
from vecpipe.errors import CommandError

__all__ = ["register"]


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the deletion trail (or, with --lineage, the model lineage of stored chunks)."""
    from vecpipe.db.audit import audit_trail, lineage

    cfg = config_from_args(args)
    since = parse_time(args.since, flag="--since") if args.since else None
    until = parse_time(args.until, flag="--until") if args.until else None
    if since and until and since >= until:
        raise CommandError(f"--since {args.since!r} is not before --until {args.until!r}; "
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


def register(sub: Any) -> None:
    """Add ``vecpipe audit``."""
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
