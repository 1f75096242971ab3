"""The chunks table as code sees it: its one column list, the COPY types, operators by metric.

``sql/0002_chunks.sql`` creates the table for DBAs to read; this module is the only place the
code lists its columns. The writer's staging table, its COPY, its merge, the benchmarks' raw
COPY and the capacity plan all take them from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg import sql

from vecpipe.config import VectorConfig

__all__ = [
    "CHANGES",
    "COLUMNS",
    "DISTANCE_OPERATORS",
    "KEY",
    "MERGED",
    "STAGING",
    "TABLE_COLUMNS",
    "Column",
    "copy_types",
    "distance_operator",
    "lock_key",
    "opclass",
    "staging_name",
    "staging_table",
]


@dataclass(frozen=True)
class Column:
    """One column the writer stages.

    ``pg_type`` is its type (``vector`` stands for the configured column type and dimension);
    ``merged``: written into chunks (else staging only); ``changes``: a different value makes
    the merge rewrite the row (content, model and what a reader sees).
    """

    name: str
    pg_type: str
    merged: bool = True
    changes: bool = False


# In COPY order; the table adds written_at, which takes its default.
COLUMNS: tuple[Column, ...] = (
    Column("tenant_id", "text"),
    Column("doc_id", "text"),
    Column("chunk_index", "int4"),
    Column("doc_version", "int8"),
    Column("chunk_count", "int4", changes=True),
    Column("content_hash", "bytea", changes=True),
    Column("content", "text"),
    Column("char_start", "int4"),
    Column("char_end", "int4"),
    Column("source_uri", "text", changes=True),
    Column("metadata", "jsonb", changes=True),
    Column("embedding", "vector"),
    Column("model_name", "text", changes=True),
    Column("model_revision", "text", changes=True),
    Column("model_backend", "text", changes=True),
    Column("embedded_at", "timestamptz"),
    # When the chunk's message was published: only the merge's checks against deletes read it.
    Column("published_at", "timestamptz", merged=False),
    # A chunk of a version that will not arrive (vecpipe.chunk.gap): it empties its slot.
    Column("gap", "bool", merged=False),
)
KEY = ("tenant_id", "doc_id", "chunk_index")
STAGING = tuple(c.name for c in COLUMNS)
MERGED = tuple(c.name for c in COLUMNS if c.merged)
CHANGES = tuple(c.name for c in COLUMNS if c.changes)
# The table adds written_at (its default) and content_tsv (0009; the merge computes it).
TABLE_COLUMNS = (*MERGED, "written_at", "content_tsv")

# metric -> (operator, operator-class suffix)
DISTANCE_OPERATORS = {"cosine": ("<=>", "cosine_ops"), "l2": ("<->", "l2_ops"),
                      "ip": ("<#>", "ip_ops")}


def copy_types(vector: VectorConfig, names: tuple[str, ...] = STAGING) -> list[str]:
    """The COPY (FORMAT BINARY) types of ``names``, the vector column as configured."""
    types = {c.name: c.pg_type for c in COLUMNS}
    return [vector.column_type if types[n] == "vector" else types[n] for n in names]


def staging_name(vector: VectorConfig) -> sql.Composed:
    """The writer's temporary staging table, named per vector type and dimension: behind a
    transaction pooler a server connection (and its temporary tables) passes from one writer to
    another, and a writer of another schema may stage vectors of another shape."""
    return sql.SQL("pg_temp.{}").format(
        sql.Identifier(f"vecpipe_staging_{vector.column_type}_{vector.dimension}"))


def staging_table(vector: VectorConfig) -> sql.Composed:
    """CREATE TEMPORARY TABLE for the writer's staging rows (see ``vecpipe.db.store``)."""
    vtype = f"{vector.column_type}({vector.dimension})"
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name),
                                sql.SQL(vtype if c.pg_type == "vector" else c.pg_type))
        for c in COLUMNS)
    return sql.SQL(
        "CREATE TEMPORARY TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS"
    ).format(staging_name(vector), columns)


def distance_operator(metric: str) -> sql.SQL:
    """The pgvector operator that orders by ``metric`` distance (smaller is closer)."""
    return sql.SQL(DISTANCE_OPERATORS[metric][0])


def opclass(vector: VectorConfig) -> sql.Identifier:
    """The index operator class for the column type and metric, e.g. halfvec_cosine_ops."""
    return sql.Identifier(f"{vector.column_type}_{DISTANCE_OPERATORS[vector.metric][1]}")


def lock_key(purpose: str, schema: str) -> int:
    """A bigint advisory-lock key for one purpose (``migrate``, ``index``) on one schema."""
    digest = hashlib.sha256(f"vecpipe.{purpose}.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
