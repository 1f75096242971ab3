"""Search: embed the query with the ingest model, then ORDER BY distance LIMIT k, tenant-scoped."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pgvector import HalfVector, Vector
from psycopg import sql
from psycopg_pool import ConnectionPool

from vecpipe.config import Config
from vecpipe.db import distance_operator

__all__ = ["Hit", "QueryEncoder", "Searcher"]


@dataclass(frozen=True)
class Hit:
    """One search result."""

    tenant_id: str
    doc_id: str
    chunk_index: int
    distance: float
    content: str
    source_uri: str
    metadata: dict[str, Any]


class QueryEncoder:
    """Protocol-like base: anything with ``encode(list[str]) -> ndarray`` embeds queries."""

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Embed texts into float32 rows."""
        raise NotImplementedError


class Searcher:
    """Top-k chunks nearest to a text or a vector, within one tenant, with metadata filters."""

    def __init__(self, cfg: Config, pool: ConnectionPool[Any], encoder: Any | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.encoder = encoder

    def vector_for(self, query: str | npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The query as a (unit, for cosine and inner product) float32 vector."""
        if isinstance(query, str):
            if self.encoder is None:
                raise ValueError("a text query needs a model; pass an encoder to Searcher.")
            vec = np.asarray(self.encoder.encode([query])[0], dtype=np.float32)
        else:
            vec = np.asarray(query, dtype=np.float32)
        if vec.shape != (self.cfg.vector.dimension,):
            raise ValueError(
                f"the query vector has {vec.shape} dimensions, the table "
                f"{self.cfg.vector.dimension}."
            )
        if self.cfg.vector.normalize:
            norm = float(np.linalg.norm(vec))
            if norm == 0:
                raise ValueError("the query vector is zero and has no direction.")
            vec = vec / norm
        return vec.astype(np.float32)

    def _statement(self, filters: Mapping[str, Any] | None, explain: bool) -> sql.Composed:
        op = distance_operator(self.cfg.vector.metric)
        where = [sql.SQL("tenant_id = %(tenant)s")]
        if filters:
            where.append(sql.SQL("metadata @> %(filters)s::jsonb"))
        body = sql.SQL(
            "SELECT tenant_id, doc_id, chunk_index, embedding {op} %(q)s AS distance, content,"
            " source_uri, metadata FROM {schema}.chunks WHERE {where}"
            " ORDER BY embedding {op} %(q)s LIMIT %(k)s"
        ).format(op=op, schema=sql.Identifier(self.cfg.database.schema),
                 where=sql.SQL(" AND ").join(where))
        if explain:
            return sql.SQL("EXPLAIN (ANALYZE, BUFFERS) {}").format(body)
        return body

    def search(
        self,
        query: str | npt.NDArray[np.float32],
        k: int = 10,
        tenant: str | None = None,
        filters: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
    ) -> list[Hit]:
        """The ``k`` nearest chunks of ``tenant`` (default: the configured one)."""
        rows = self._run(query, k, tenant, filters, ef_search, explain=False)
        return [Hit(r[0], r[1], r[2], float(r[3]), r[4], r[5], r[6]) for r in rows]

    def explain(
        self,
        query: str | npt.NDArray[np.float32],
        k: int = 10,
        tenant: str | None = None,
        filters: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
    ) -> str:
        """EXPLAIN (ANALYZE, BUFFERS) of the search, as text."""
        rows = self._run(query, k, tenant, filters, ef_search, explain=True)
        return "\n".join(r[0] for r in rows)

    def _run(self, query: str | npt.NDArray[np.float32], k: int, tenant: str | None,
             filters: Mapping[str, Any] | None, ef_search: int | None,
             explain: bool) -> list[Any]:
        vec = self.vector_for(query)
        wrapped = HalfVector(vec) if self.cfg.vector.column_type == "halfvec" else Vector(vec)
        params = {"q": wrapped, "k": k, "tenant": tenant or self.cfg.produce.tenant,
                  "filters": json.dumps(dict(filters or {}))}
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
                sql.Literal(ef_search or self.cfg.vector.ef_search)))
            conn.execute(sql.SQL("SET LOCAL ivfflat.probes = {}").format(
                sql.Literal(self.cfg.vector.ivfflat_probes)))
            rows: list[Any] = conn.execute(self._statement(filters, explain), params).fetchall()
            return rows
