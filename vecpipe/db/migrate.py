"""Applies the numbered SQL files of ``sql/`` in order, once each, from any number of pods at once.

Applied migrations are recorded with a checksum; an already applied file that was edited since is
reported instead of silently skipped. A transaction-scoped advisory lock serialises concurrent
runs: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from vecpipe.config import Config
from vecpipe.db.fulltext import ensure_text_index, fill_text
from vecpipe.db.indexes import create_locked
from vecpipe.db.pool import connect
from vecpipe.db.schema import lock_key
from vecpipe.errors import ConfigError, MigrationError
from vecpipe.resources import resource_dir

__all__ = ["Migration", "load_migrations", "migrate", "render", "variables"]

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# psql variables: :"name" is an identifier, :name a value; '::' casts are left alone.
_IDENT_VAR = re.compile(r'(?<!:):"([a-z_]+)"')
_VALUE_VAR = re.compile(r"(?<![:\w]):([a-z_]+)\b")
# :'name' is the variable as a quoted string literal.
_LITERAL_VAR = re.compile(r"(?<!:):'([a-z_]+)'")


@dataclass(frozen=True)
class Migration:
    """One file of sql/."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        """sha256 of the file as written (before variables are filled in)."""
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migrations shipped with this build, in order."""
    found = []
    for entry in resource_dir("sql").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def variables(cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """The psql variables the migrations use: identifiers and validated values."""
    idents = {"schema": cfg.database.schema, "app_role": cfg.database.app_role,
              "serve_role": cfg.serve.role}
    values = {"vector_type": cfg.vector.column_type, "dimension": str(cfg.vector.dimension)}
    return idents, values


def render(text: str, idents: dict[str, str], values: dict[str, str]) -> str:
    """Fill psql-style variables; only known names are replaced, as psql does."""

    def ident(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in idents:
            return m.group(0)
        return '"' + idents[name].replace('"', '""') + '"'

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        return values.get(name, m.group(0))

    def literal(m: re.Match[str]) -> str:
        name = m.group(1)
        known = {**values, **idents}
        if name not in known:
            return m.group(0)
        return "'" + known[name].replace("'", "''") + "'"

    text = _LITERAL_VAR.sub(literal, text)
    return _VALUE_VAR.sub(value, _IDENT_VAR.sub(ident, text))


def migrate(cfg: Config, *, with_index: bool = True, log: Any = None) -> list[str]:
    """Apply what is missing; return the names applied. Safe to run twice, and concurrently."""
    applied_now: list[str] = []
    idents, values = variables(cfg)
    schema = sql.Identifier(cfg.database.schema)
    with connect(cfg.database, vector_types=False) as conn:
        # Waiting for another pod's migration (and its index build) is not a slow query.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)",
                     (lock_key("migrate", cfg.database.schema),))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())").format(schema))
        done = {
            row[0]: (row[1], row[2])
            for row in conn.execute(sql.SQL(
                "SELECT version, name, checksum FROM {}.schema_migrations").format(schema))
        }
        for mig in load_migrations():
            if mig.version in done:
                name, checksum = done[mig.version]
                if checksum != mig.checksum:
                    raise MigrationError(
                        f"Migration {mig.version:04d}_{name}.sql was edited after it was applied "
                        f"(checksum {checksum[:12]} in the database, {mig.checksum[:12]} now); "
                        "add a new numbered migration instead of editing an applied one."
                    )
                continue
            try:
                conn.execute(render(mig.text, idents, values).encode())
            except psycopg.Error as exc:
                raise MigrationError(
                    f"Migration {mig.version:04d}_{mig.name}.sql failed: "
                    f"{str(exc).strip().splitlines()[0]}."
                ) from None
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)").format(schema),
                (mig.version, mig.name, mig.checksum),
            )
            applied_now.append(f"{mig.version:04d}_{mig.name}")
            if log is not None:
                log.info("migration_applied", migration=applied_now[-1])
        _check_column(conn, cfg)
        if cfg.serve.role_password:
            # The serve role's password, from its own Secret; never logged (no statement is).
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(cfg.serve.role), sql.Literal(cfg.serve.role_password)))
        if with_index and cfg.vector.index != "none":
            create_locked(conn, cfg)
        conn.commit()
    # The full-text column of 0009: the rows written before it, then its index.
    filled = fill_text(cfg)
    if filled and log is not None:
        log.info("full_text_filled", rows=filled)
    ensure_text_index(cfg)
    return applied_now


def _check_column(conn: psycopg.Connection[Any], cfg: Config) -> None:
    row = conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = 'chunks' AND a.attname = 'embedding'",
        (cfg.database.schema,),
    ).fetchone()
    want = f"{cfg.vector.column_type}({cfg.vector.dimension})"
    if row is not None and row[0] != want:
        raise ConfigError(
            f"The chunks table stores {row[0]} but the configuration asks for {want} "
            "(vector.column_type, vector.dimension); use a new schema (VECPIPE_DB_SCHEMA) for a "
            "new model, or change the configuration back."
        )
