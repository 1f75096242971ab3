"""``vecpipe audit``: the deletion trail (GDPR/CCPA), the replays of dead letters, or the model
lineage of stored chunks."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from vecpipe.cli.common import add_db_flags, config_from_args, parse_time
from vecpipe.errors import CommandError

__all__ = ["register", "render_replays"]


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the deletion trail (or, with --replays, the replays; with --lineage, the model
    lineage of stored chunks)."""
    from vecpipe.db.audit import audit_trail, lineage, replay_trail

    _check_flags(args)
    cfg = config_from_args(args)
    since = parse_time(args.since, flag="--since") if args.since else None
    until = parse_time(args.until, flag="--until") if args.until else None
    if since and until and since >= until:
        raise CommandError(f"--since {args.since!r} is not before --until {args.until!r}; "
                         "nothing can match.")
    if args.lineage:
        rows = lineage(cfg, tenant=args.audit_tenant)
    elif args.replays:
        rows = replay_trail(cfg, since=since, until=until, limit=args.limit)
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
    if args.replays:
        for line in render_replays(rows):
            print(line)
        if len(rows) == args.limit:
            print(f"(newest {args.limit} replays; --limit shows more)")
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


def _check_flags(args: argparse.Namespace) -> None:
    """--replays and --lineage are views of their own: the deletion trail's filters do not
    apply to them."""
    if args.replays and args.lineage:
        raise CommandError("--replays and --lineage are two different listings; give one.")
    if args.replays:
        given = [flag for flag, value in (("--tenant", args.audit_tenant),
                                          ("--action", args.action)) if value is not None]
        if given:
            raise CommandError(f"{' and '.join(given)} select deletions, not replays (a replay "
                               "is not one tenant's); leave it out with --replays.")
    if args.limit < 1:
        raise CommandError(f"--limit must be at least 1, got {args.limit}.")


# -- replays ------------------------------------------------------------------------------------

# Written as the flags were given; the instants --since/--until meant are shown beside them.
_NOT_FLAGS = ("topic", "since_at", "until_at")


def _flags(filters: dict[str, Any]) -> str:
    """The selection as a command line: ``--error-class X --since 3h (2025-...)``."""
    parts = []
    for name, value in filters.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        at = filters.get(f"{name}_at")
        if at and at != text:
            text += f" ({_ts(datetime.fromisoformat(at))})"
        parts.append(f"{flag} {text}")
    return " ".join(parts) or "(none: every record)"


_SKIPS = (("skipped_by_filter", "by filter"),
          ("skipped_max_replays", "already at max_replays"),
          ("skipped_no_origin", "no original topic"),
          ("skipped_truncated", "truncated"),
          ("skipped_erased", "erased by a later delete"))


def render_replays(rows: list[dict[str, Any]]) -> list[str]:
    """Each replay in a few lines: when, outcome, who and what, then its flags, where the
    records went, what was skipped and why it failed."""
    if not rows:
        return ["no replays recorded"]
    lines: list[str] = []
    for r in rows:
        counts = r["counts"] or {}
        outcome = r["status"]
        if r["status"] == "done":
            outcome += f" ({r['ended']})"
        elif r["status"] == "running":
            outcome += f" (last report {_ts(r['updated_at'])}: still going, or killed)"
        span = _ts(r["started_at"])
        if r["finished_at"]:
            span += f" .. {_ts(r['finished_at'])}"
        dry = "DRY RUN  " if r["dry_run"] else ""
        lines.append(f"#{r['id']}  {span}  {dry}{outcome}")
        lines.append(f"    by {r['actor']} ({r['worker']}) on {r['dlq_topic']}, group "
                     f"{r['consumer_group']}")
        lines.append(f"    flags: {_flags(r['filters'] or {})}")
        verb = "would replay" if r["dry_run"] else "replayed"
        targets = ", ".join(f"{t} {n}" for t, n in (counts.get("targets") or {}).items())
        lines.append(f"    {verb} {counts.get('replayed', 0)}"
                     + (f" to {targets}" if targets else "")
                     + (" so far" if r["status"] == "running" else ""))
        skips = ", ".join(f"{counts[k]} {why}" for k, why in _SKIPS if counts.get(k))
        if skips:
            lines.append(f"    skipped {skips}")
        if r["error"]:
            lines.append(f"    error: {r['error']}")
    return lines


def _ts(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def register(sub: Any) -> None:
    """Add ``vecpipe audit``."""
    p = sub.add_parser("audit", help="the deletion trail (GDPR/CCPA), replays, or model lineage")
    p.add_argument("--tenant", dest="audit_tenant", metavar="TENANT")
    p.add_argument("--since", help="ISO date/time or age (30m, 12h, 7d)")
    p.add_argument("--until", help="ISO date/time or age")
    p.add_argument("--action", choices=["delete_document", "delete_tenant"])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--replays", action="store_true",
                   help="instead: the dead-letter replays, newest first (who, when, flags, "
                        "what went where)")
    p.add_argument("--lineage", action="store_true",
                   help="instead: chunks per tenant and model (name, revision, backend)")
    p.add_argument("--json", action="store_true")
    add_db_flags(p)
    p.set_defaults(func=cmd_audit)
