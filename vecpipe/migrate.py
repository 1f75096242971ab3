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

from vecpipe.config import Config, ConfigError
from vecpipe.db import connect, opclass
from vecpipe.resources import resource_dir

__all__ = [
    "Migration",
    "MigrationError",
    "ensure_index",
    "index_definition",
    "index_name",
    "index_state",
    "load_migrations",
    "migrate",
    "render",
]

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# psql variables: :"name" is an identifier, :name a value; '::' casts are left alone.
_IDENT_VAR = re.compile(r'(?<!:):"([a-z_]+)"')
_VALUE_VAR = re.compile(r"(?<![:\w]):([a-z_]+)\b")
# :'name' is the variable as a quoted string literal.
_LITERAL_VAR = re.compile(r"(?<!:):'([a-z_]+)'")


class MigrationError(RuntimeError):
    """A migration cannot be applied, or an applied one was edited."""


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
    idents = {"schema": cfg.database.schema, "app_role": cfg.database.app_role}
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


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"vecpipe.migrate.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migrate(cfg: Config, *, with_index: bool = True, log: Any = None) -> list[str]:
    """Apply what is missing; return the names applied. Safe to run twice, and concurrently."""
    applied_now: list[str] = []
    idents, values = variables(cfg)
    schema = sql.Identifier(cfg.database.schema)
    with connect(cfg.database, vector_types=False) as conn:
        # Waiting for another pod's migration (and its index build) is not a slow query.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(cfg.database.schema),))
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
        if with_index and cfg.vector.index != "none":
            _create_index_locked(conn, cfg)
        conn.commit()
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


def index_name(cfg: Config) -> str:
    """The vector index's name: method and metric, so that a changed setting makes a new one."""
    v = cfg.vector
    return f"chunks_embedding_{v.index}_{v.metric}"


def index_definition(cfg: Config, *, concurrently: bool, name: str | None = None) -> sql.Composed:
    """CREATE INDEX for the configured method, metric and parameters."""
    v = cfg.vector
    if v.index == "hnsw":
        params = sql.SQL("m = {}, ef_construction = {}").format(
            sql.Literal(v.hnsw_m), sql.Literal(v.hnsw_ef_construction))
    else:
        params = sql.SQL("lists = {}").format(sql.Literal(v.ivfflat_lists))
    return sql.SQL(
        "CREATE INDEX {conc} IF NOT EXISTS {name} ON {schema}.chunks "
        "USING {method} (embedding {opclass}) WITH ({params})"
    ).format(
        conc=sql.SQL("CONCURRENTLY" if concurrently else ""),
        name=sql.Identifier(name or index_name(cfg)),
        schema=sql.Identifier(cfg.database.schema),
        method=sql.SQL(v.index),
        opclass=opclass(v),
        params=params,
    )


def index_state(conn: psycopg.Connection[Any], schema: str, name: str) -> str | None:
    """'valid', 'invalid' (a failed concurrent build left it), or None: no such index."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        (sql.Identifier(schema, name).as_string(conn),),
    ).fetchone()
    if row is None:
        return None
    return "valid" if row[0] else "invalid"


def _create_index_locked(conn: psycopg.Connection[Any], cfg: Config) -> None:
    """CREATE INDEX inside the migration's transaction, under its lock.

    Two plain CREATE INDEX IF NOT EXISTS statements do not block each other (both take a SHARE
    lock), so two pods would race for the name; the advisory lock serialises them. An INVALID
    index of the same name (a failed concurrent build) would make IF NOT EXISTS skip silently,
    leaving searches without an index: it is dropped and built again.
    """
    db = cfg.database
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
        sql.Literal(db.maintenance_work_mem)))
    conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(
        sql.Literal(db.max_parallel_maintenance_workers)))
    name = index_name(cfg)
    if index_state(conn, db.schema, name) == "invalid":
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(db.schema, name)))
    conn.execute(index_definition(cfg, concurrently=False))


def ensure_index(cfg: Config, *, concurrently: bool) -> str:
    """Create the configured vector index if it is missing (or invalid); return its name."""
    if concurrently:
        from vecpipe.indexes import build

        return build(cfg).name
    with connect(cfg.database, vector_types=False) as conn:
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(cfg.database.schema),))
        _create_index_locked(conn, cfg)
        conn.commit()
    return index_name(cfg)
