"""``vecpipe serve`` (the HTTP API) and ``vecpipe keys`` (its per-tenant API keys)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vecpipe.cli.common import add_db_flags, add_kafka_flags, add_model_flags, config_from_args
from vecpipe.errors import CommandError

__all__ = ["register"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP API until SIGTERM."""
    from workers.serve import run

    cfg = config_from_args(args, serve={"host": args.host, "port": args.port})
    print(f"vecpipe serve on http://{cfg.serve.host}:{cfg.serve.port} "
          f"(API docs at /docs, search page at /)", flush=True)
    run(cfg)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key and print it, once."""
    from vecpipe.db.keys import create_key

    cfg = config_from_args(args)
    issued = create_key(cfg, args.tenant, admin=args.admin, label=args.label or "")
    if args.json:
        print(json.dumps({"key_id": issued.key_id, "key": issued.key,
                          "tenant_id": issued.tenant_id, "admin": issued.admin}))
        return 0
    kind = "admin key" if issued.admin else "key"
    print(f"{kind} {issued.key_id} for tenant {issued.tenant_id} (shown once; store it now):")
    print(issued.key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """List keys, without their secrets."""
    from vecpipe.db.keys import list_keys

    cfg = config_from_args(args)
    keys = list_keys(cfg, args.tenant)
    if args.json:
        print(json.dumps([{"key_id": k.key_id, "tenant_id": k.tenant_id, "admin": k.admin,
                           "label": k.label, "created_at": k.created_at.isoformat(),
                           "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                          for k in keys]))
        return 0
    if not keys:
        print("no keys")
        return 0
    print(f"{'key':<10} {'tenant':<20} {'admin':<5} {'created':<20} {'revoked':<20} label")
    for k in keys:
        revoked = f"{k.revoked_at:%Y-%m-%d %H:%M:%S}" if k.revoked_at else "-"
        print(f"{k.key_id:<10} {k.tenant_id:<20} {'yes' if k.admin else 'no':<5} "
              f"{k.created_at:%Y-%m-%d %H:%M:%S}  {revoked:<20} {k.label}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by its id."""
    from vecpipe.db.keys import revoke_key

    cfg = config_from_args(args)
    if not revoke_key(cfg, args.key_id):
        raise CommandError(f"No active key {args.key_id!r}; 'vecpipe keys list' shows them.")
    print(f"revoked {args.key_id}; replicas stop accepting it within serve.key_cache_s "
          f"({cfg.serve.key_cache_s:g} s)")
    return 0


def register(sub: Any) -> None:
    """Add ``vecpipe serve`` and ``vecpipe keys``."""
    p = sub.add_parser("serve", help="run the HTTP API (search, documents, keys' tenants)")
    p.add_argument("--host", help="address to listen on (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (serve.port, default 8080)")
    add_kafka_flags(p)
    add_db_flags(p)
    add_model_flags(p)
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="API keys of vecpipe serve, one tenant each")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="create a key for a tenant and print it once")
    c.add_argument("--tenant", required=True, help="the tenant the key is bound to")
    c.add_argument("--admin", action="store_true",
                   help="may also run tenant-wide operations (erase the tenant)")
    c.add_argument("--label", help="a note for the listing, e.g. the service using the key")
    c.add_argument("--json", action="store_true")
    add_db_flags(c)
    c.set_defaults(func=cmd_keys_create)
    ls = ks.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--tenant", help="only this tenant's keys")
    ls.add_argument("--json", action="store_true")
    add_db_flags(ls)
    ls.set_defaults(func=cmd_keys_list)
    r = ks.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("key_id", help="the id 'vecpipe keys list' shows (or the key itself)")
    add_db_flags(r)
    r.set_defaults(func=cmd_keys_revoke)
