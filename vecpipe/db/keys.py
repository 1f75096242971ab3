"""API keys: each bound to one tenant, stored as sha256, shown once when created.

A key is ``vp_<id>_<secret>``: the id (8 hex digits) names the key in listings, logs and
revocation; the secret is 256 random bits. Only sha256 of the whole key is stored, so a copy of
the table reveals no key. The service resolves a key through ``resolve_key`` (SECURITY DEFINER,
migration 0009): it never reads the table itself.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from vecpipe.config import Config
from vecpipe.db.pool import connect
from vecpipe.errors import CommandError

__all__ = ["IssuedKey", "KeyInfo", "Principal", "create_key", "hash_key", "list_keys",
           "resolve_key", "revoke_key"]

_PREFIX = "vp_"


@dataclass(frozen=True)
class IssuedKey:
    """A new key: ``key`` is shown this once and never stored."""

    key_id: str
    key: str
    tenant_id: str
    admin: bool


@dataclass(frozen=True)
class KeyInfo:
    """A stored key, without its secret."""

    key_id: str
    tenant_id: str
    admin: bool
    label: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Principal:
    """Who a request is: its key and the one tenant the key is bound to."""

    key_id: str
    tenant_id: str
    admin: bool


def hash_key(key: str) -> bytes:
    """sha256 of the key as sent."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def create_key(cfg: Config, tenant: str, *, admin: bool = False, label: str = "") -> IssuedKey:
    """Store a new key for ``tenant``; the returned key is the only copy of it."""
    if not tenant:
        raise CommandError("A key needs the tenant it is for; give --tenant.")
    key_id = secrets.token_hex(4)
    key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    with connect(cfg.database, vector_types=False) as conn:
        conn.execute(sql.SQL(
            "INSERT INTO {} (key_id, key_hash, tenant_id, admin, label)"
            " VALUES (%s, %s, %s, %s, %s)").format(_table(cfg)),
            (key_id, hash_key(key), tenant, admin, label))
        conn.commit()
    return IssuedKey(key_id, key, tenant, admin)


def list_keys(cfg: Config, tenant: str | None = None) -> list[KeyInfo]:
    """The stored keys (of one tenant, if given), oldest first."""
    where = sql.SQL("WHERE tenant_id = %(t)s") if tenant else sql.SQL("")
    with connect(cfg.database, vector_types=False) as conn:
        rows = conn.execute(sql.SQL(
            "SELECT key_id, tenant_id, admin, label, created_at, revoked_at FROM {} {}"
            " ORDER BY created_at, key_id").format(_table(cfg), where), {"t": tenant}).fetchall()
    return [KeyInfo(*r) for r in rows]


def revoke_key(cfg: Config, key_id: str) -> bool:
    """Revoke a key by its id; False when no such key is active."""
    key_id = key_id.removeprefix(_PREFIX).split("_")[0]
    with connect(cfg.database, vector_types=False) as conn:
        done = conn.execute(sql.SQL(
            "UPDATE {} SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL").format(
            _table(cfg)), (key_id,)).rowcount
        conn.commit()
    return done > 0


def resolve_key(conn: psycopg.Connection[Any], schema: str, key: str) -> Principal | None:
    """The principal of an active key, through the owner's ``resolve_key`` function."""
    if not key.startswith(_PREFIX) or len(key) > 128:
        return None
    row = conn.execute(sql.SQL("SELECT key_id, tenant_id, admin FROM {}.resolve_key(%s)").format(
        sql.Identifier(schema)), (hash_key(key),), prepare=False).fetchone()
    return Principal(row[0], row[1], bool(row[2])) if row else None


def _table(cfg: Config) -> sql.Identifier:
    return sql.Identifier(cfg.database.schema, "api_keys")
