"""Search: embed the query with the ingest model, then the k nearest chunks of one tenant.

Every search runs as the application role under row-level security (``SET LOCAL ROLE`` and
``SET LOCAL vecpipe.tenant`` inside its read-only transaction), so it can only ever see one
tenant's rows. How the nearest rows are found is chosen per query, because a tenant-scoped or
filtered query on a shared ANN index post-filters the index's candidates and returns too few
rows, at poor recall, unless that is planned for. The rule (``strategy="auto"``):

1. The planner's estimate of the tenant's rows (EXPLAIN, nothing read). Up to 4 x
   ``exact_max_rows`` (default 5,000), the tenant's rows are counted, stopping at the limit (an
   index-only scan of the primary key). A tenant with at most ``exact_max_rows`` rows gets an
   **exact** scan: every row's distance, sorted; recall 1.0, cost bounded by the limit.
2. With filters, the addresses of the rows that match tenant and filters are collected, at most
   ``exact_max_rows + 1``, using GIN and the primary key as the owner (under row-level security
   jsonb ``@>`` is not leakproof and could not use GIN). If the filters keep at most the limit,
   those rows are read by address (a TID scan) and ranked **exactly**.
3. Otherwise the ANN index: the tenant's own partial index when a valid one exists
   (``vecpipe index create --tenant T``, **tenant_index**), else the **shared_index**. Either
   way with iterative scans (``hnsw.iterative_scan = relaxed_order``; ivfflat's for IVFFlat), so
   filtered-out neighbours do not shrink the result below k, and ``ef_search`` raised by
   1/sqrt(share) and ``hnsw.max_scan_tuples`` to 50 k / share, where share is the fraction of
   the index's rows that tenant and filters keep.

Row addresses and search read one snapshot (REPEATABLE READ), so an address still names the row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector import HalfVector, Vector
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from vecpipe.config import Config
from vecpipe.db.filters import CompiledFilter, compile_filter
from vecpipe.db.indexes import index_name, index_state, tenant_index_name
from vecpipe.db.pool import local_timeout
from vecpipe.db.schema import distance_operator
from vecpipe.errors import SearchError
from vecpipe.model import normalize, vector_problem

__all__ = [
    "MODES",
    "STRATEGIES",
    "DocumentState",
    "Hit",
    "QueryEncoder",
    "SearchPolicy",
    "SearchResult",
    "Searcher",
    "Strategy",
    "fuse",
]

# What a caller may ask for; "auto" applies the rule of the module docstring.
STRATEGIES = ("auto", "exact", "tenant_index", "shared_index")
# What a search matches: embeddings, words, or both fused.
MODES = ("vector", "keyword", "hybrid")


@dataclass(frozen=True)
class Hit:
    """One search result. ``score``: higher is better (the similarity for vector search,
    ts_rank_cd for keyword search, the fused reciprocal rank for hybrid); ``distance``: the
    vector distance, None when no vector was compared (keyword search)."""

    tenant_id: str
    doc_id: str
    chunk_index: int
    distance: float | None
    content: str
    source_uri: str
    metadata: dict[str, Any]
    doc_version: int = 0
    score: float = 0.0


@dataclass(frozen=True)
class SearchPolicy:
    """The thresholds of the strategy rule (see the module docstring).

    ``exact_max_rows``: matching rows up to which an exact scan is used. An exact scan costs
    about 3 microseconds a row (384 dimensions, cached), an HNSW search 5 to 30 milliseconds:
    5,000 rows is where they cross, and below it the exact scan also has recall 1.0.
    ``max_ef_search`` and ``max_scan_tuples_cap`` bound what a very selective query on the
    shared index may cost.
    """

    exact_max_rows: int = 5_000
    iterative_scan: str = "relaxed_order"
    max_ef_search: int = 1000
    min_scan_tuples: int = 20_000
    max_scan_tuples_cap: int = 1_000_000
    # Hybrid search fuses this many candidates of each kind (reciprocal rank fusion, with the
    # customary constant 60): enough that a hit ranked low by one list can still win.
    min_candidates: int = 40
    max_candidates: int = 200
    rrf_k: int = 60

    def candidates(self, k: int) -> int:
        """How many candidates of each kind a hybrid search of ``k`` results fuses."""
        return max(k, min(self.max_candidates, max(self.min_candidates, 4 * k)))


@dataclass(frozen=True)
class Strategy:
    """How one search found its rows, and why."""

    kind: str
    # Rows of the tenant matching the filters: counted exactly up to the exact limit, above it a
    # lower bound (filters) or the planner's estimate (tenant alone). None when not looked at.
    rows: int | None = None
    rows_exact: bool = False
    index: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""

    def describe(self) -> str:
        """One line for people: the strategy, the rows, the settings."""
        rows = ""
        if self.rows is not None:
            rows = f"{self.rows} rows" if self.rows_exact else f"~{self.rows} rows"
        parts = [self.kind.replace("_", " ")]
        if self.index:
            parts.append(f"index {self.index}")
        if rows:
            parts.append(rows)
        parts.extend(f"{k}={v}" for k, v in self.settings.items())
        line = ", ".join(parts)
        return f"{line} ({self.reason})" if self.reason else line


@dataclass(frozen=True)
class SearchResult:
    """The hits, the strategy that found them and how long it took."""

    hits: list[Hit]
    strategy: Strategy
    elapsed_ms: float
    mode: str = "vector"


@dataclass(frozen=True)
class DocumentState:
    """What the database holds of one document: its newest version and its chunks."""

    doc_id: str
    version: int
    deleted: bool
    chunk_count: int
    chunks_stored: int
    model: str | None
    updated_at: datetime
    written_at: datetime | None

    @property
    def searchable(self) -> bool:
        """Every chunk of the stored version is written."""
        return not self.deleted and self.chunks_stored >= self.chunk_count


class QueryEncoder:
    """Protocol-like base: anything with ``encode(list[str]) -> ndarray`` embeds queries."""

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Embed texts into float32 rows."""
        raise NotImplementedError


class Searcher:
    """Top-k chunks nearest to a text or a vector, within one tenant, with metadata filters."""

    def __init__(self, cfg: Config, pool: ConnectionPool[Any], encoder: Any | None = None,
                 policy: SearchPolicy | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.encoder = encoder
        self.policy = policy or SearchPolicy()
        self._schema = sql.Identifier(cfg.database.schema)
        self._op = distance_operator(cfg.vector.metric)

    def vector_for(self, query: str | npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The query as a (unit, for cosine and inner product) float32 vector."""
        if isinstance(query, str):
            if self.encoder is None:
                raise SearchError("a text query needs a model; pass an encoder to Searcher.")
            vec = np.asarray(self.encoder.encode([query])[0], dtype=np.float32)
        else:
            vec = np.asarray(query, dtype=np.float32)
        if vec.shape != (self.cfg.vector.dimension,):
            raise SearchError(
                f"the query vector has {vec.shape} dimensions, the table "
                f"{self.cfg.vector.dimension}."
            )
        problem = vector_problem(vec)
        if problem is not None:
            raise SearchError(f"the query is {problem}.")
        return normalize(vec) if self.cfg.vector.normalize else vec

    # -- public API ------------------------------------------------------------------------------

    def search(
        self,
        query: str | npt.NDArray[np.float32],
        k: int = 10,
        tenant: str | None = None,
        filters: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        strategy: str = "auto",
    ) -> list[Hit]:
        """The ``k`` nearest chunks of ``tenant`` (required: there is no default tenant)."""
        return self.query(query, k, tenant, filters, ef_search, strategy).hits

    def query(
        self,
        query: str | npt.NDArray[np.float32],
        k: int = 10,
        tenant: str | None = None,
        filters: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        strategy: str = "auto",
        mode: str = "vector",
        text: str | None = None,
    ) -> SearchResult:
        """Like :meth:`search`, with the strategy chosen and the elapsed time.

        ``mode``: ``vector`` (nearest embeddings), ``keyword`` (full-text match, ranked by
        ts_rank_cd) or ``hybrid`` (both, fused by reciprocal rank). ``text``: the query's words
        when ``query`` is its vector already (a caller that batches its encoding).
        """
        started = time.perf_counter()
        if mode not in MODES:
            raise SearchError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        words = query if isinstance(query, str) else text
        if mode != "vector" and not (words and words.strip()):
            raise SearchError(f"{mode} search needs the query's words; a vector alone cannot "
                              "be matched with text.")
        self._check(k, strategy)
        compiled = compile_filter(filters)
        vec = None if mode == "keyword" else self.vector_for(query)
        with self._transaction(tenant) as (conn, who):
            if mode == "keyword":
                assert words is not None
                chosen = Strategy("keyword", reason="full-text match of the tenant's rows")
                hits = self._keyword(conn, who, words, k, compiled, None)
            elif mode == "vector":
                assert vec is not None
                chosen, hits = self._nearest(conn, who, vec, k, compiled, ef_search, strategy)
            else:
                assert vec is not None and words is not None
                n = self.policy.candidates(k)
                # Words first: the vector strategy's settings are for its own statement.
                matched = self._keyword(conn, who, words, n, compiled, vec)
                chosen, near = self._nearest(conn, who, vec, n, compiled, ef_search, strategy)
                hits = fuse(near, matched, k, self.policy.rrf_k)
        return SearchResult(hits, chosen, (time.perf_counter() - started) * 1000, mode)

    def explain(
        self,
        query: str | npt.NDArray[np.float32],
        k: int = 10,
        tenant: str | None = None,
        filters: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        strategy: str = "auto",
    ) -> str:
        """The strategy, then EXPLAIN (ANALYZE, BUFFERS) of the search as the application role."""
        self._check(k, strategy)
        compiled = compile_filter(filters)
        vec = self.vector_for(query)
        with self._transaction(tenant) as (conn, who):
            chosen, statement, params = self._plan(conn, who, vec, k, compiled, ef_search,
                                                   strategy)
            rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) {}").format(statement),
                                params, prepare=False).fetchall()
        return "\n".join([f"strategy: {chosen.describe()}", *(_clip(r[0]) for r in rows)])

    def document(self, doc_id: str, tenant: str | None) -> DocumentState | None:
        """The stored state of one of the tenant's documents, read through the policy: None
        when the tenant has no such document."""
        with self._transaction(tenant) as (conn, who):
            row = conn.execute(sql.SQL(
                "SELECT d.version, d.deleted, d.chunk_count, d.updated_at,"
                " (SELECT count(*) FROM {s}.chunks c WHERE c.tenant_id = d.tenant_id"
                "  AND c.doc_id = d.doc_id),"
                " (SELECT max(c.written_at) FROM {s}.chunks c WHERE c.tenant_id = d.tenant_id"
                "  AND c.doc_id = d.doc_id),"
                " (SELECT c.model_name FROM {s}.chunks c WHERE c.tenant_id = d.tenant_id"
                "  AND c.doc_id = d.doc_id LIMIT 1)"
                " FROM {s}.documents d WHERE d.tenant_id = %s AND d.doc_id = %s").format(
                s=self._schema), (who, doc_id), prepare=False).fetchone()
        if row is None:
            return None
        return DocumentState(doc_id, int(row[0]), bool(row[1]), int(row[2]), int(row[4]),
                             row[6], row[3], row[5])


    def _check(self, k: int, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise SearchError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}.")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}.")

    @contextmanager
    def _transaction(self, tenant: str | None) -> Iterator[tuple[psycopg.Connection[Any], str]]:
        """A read-only snapshot as the application role, for one tenant (SET LOCAL, both)."""
        if not tenant:
            # Never a default: a search that forgot its tenant must not read someone's rows.
            raise SearchError("a search needs the tenant it is for; none was given.")
        with self.pool.connection() as conn, conn.transaction():
            # One snapshot for choosing and searching: row addresses collected for an exact scan
            # are still the rows' addresses when the search reads them.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            local_timeout(conn, self.cfg.database.statement_timeout_ms)
            self._become_tenant(conn, tenant)
            yield conn, tenant

    def _nearest(self, conn: psycopg.Connection[Any], tenant: str,
                 vec: npt.NDArray[np.float32], k: int, compiled: CompiledFilter,
                 ef_search: int | None, strategy: str) -> tuple[Strategy, list[Hit]]:
        chosen, statement, params = self._plan(conn, tenant, vec, k, compiled, ef_search,
                                               strategy)
        rows = conn.execute(statement, params, prepare=False).fetchall()
        hits = [self._hit(r) for r in rows]
        return chosen, sorted(hits, key=lambda h: (h.distance, h.doc_id, h.chunk_index))

    def _plan(self, conn: psycopg.Connection[Any], tenant: str, vec: npt.NDArray[np.float32],
              k: int, compiled: CompiledFilter, ef_search: int | None,
              strategy: str) -> tuple[Strategy, sql.Composed, dict[str, Any]]:
        """Choose the strategy, apply its settings; the statement and its parameters."""
        params = self._params(tenant, compiled)
        params.update(q=self._wrap(vec), k=k)
        chosen, ctids = self._choose(conn, compiled, params, k, ef_search, strategy)
        _set_local(conn, chosen.settings)
        if ctids is not None:
            params["ctids"] = ctids
        return chosen, self._statement(chosen, compiled, ctids is not None, tenant), params

    def _keyword(self, conn: psycopg.Connection[Any], tenant: str, words: str, n: int,
                 compiled: CompiledFilter, vec: npt.NDArray[np.float32] | None) -> list[Hit]:
        """The tenant's ``n`` best full-text matches, best first (their distances too, given a
        vector). Found by the owner's GIN index (``keyword_rows``), read through the policy."""
        params = self._params(tenant, compiled)
        params.update(words=words, config=self.cfg.database.text_search_config, n=n)
        ranked = conn.execute(sql.SQL(
            "SELECT row_id::text, rank FROM {}.keyword_rows(%(words)s, %(config)s::regconfig,"
            " %(n)s, %(contain)s, %(path)s)").format(self._schema), params,
            prepare=False).fetchall()
        if not ranked:
            return []
        distance: sql.Composable = sql.SQL("NULL::float8")
        if vec is not None:
            params["q"] = self._wrap(vec)
            distance = sql.SQL("embedding {} %(q)s").format(self._op)
        params["ctids"] = [r[0] for r in ranked]
        rows = conn.execute(sql.SQL(
            "SELECT ctid::text, {columns} FROM {schema}.chunks"
            " WHERE ctid = ANY (%(ctids)s::tid[]) AND tenant_id = %(tenant)s").format(
            columns=self._columns(distance), schema=self._schema), params,
            prepare=False).fetchall()
        by_address = {r[0]: r for r in rows}
        hits = []
        for address, rank in ranked:
            if address in by_address:
                hit = self._hit(by_address[address])
                hits.append(replace(hit, score=float(rank)))
        return hits

    def _params(self, tenant: str, compiled: CompiledFilter) -> dict[str, Any]:
        return {"tenant": tenant, "contain": Jsonb(compiled.contain) if compiled.contain else None,
                "path": compiled.path}

    def _wrap(self, vec: npt.NDArray[np.float32]) -> Any:
        return HalfVector(vec) if self.cfg.vector.column_type == "halfvec" else Vector(vec)

    def _hit(self, r: Any) -> Hit:
        """A row of ``_columns`` (after its address) as a Hit; the score from the distance."""
        distance = None if r[4] is None else float(r[4])
        score = 0.0
        if distance is not None:
            score = 1.0 - distance if self.cfg.vector.metric == "cosine" else -distance
        return Hit(r[1], r[2], r[3], distance, r[5], r[6], r[7], int(r[8]), score)

    def _columns(self, distance: sql.Composable) -> sql.Composed:
        return sql.SQL("tenant_id, doc_id, chunk_index, {} AS distance, content, source_uri,"
                       " metadata, doc_version").format(distance)

    def _become_tenant(self, conn: psycopg.Connection[Any], tenant: str) -> None:
        """Switch to the application role and one tenant, for this transaction only."""
        role = self.cfg.database.app_role
        try:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        except (psycopg.errors.UndefinedObject, psycopg.errors.InvalidParameterValue):
            raise SearchError(
                f"The role {role!r} (database.app_role, VECPIPE_DATABASE_APP_ROLE) does not "
                "exist in this database; run 'vecpipe migrate' first."
            ) from None
        except psycopg.errors.InsufficientPrivilege:
            raise SearchError(
                f"The database user may not switch to the role {role!r} (database.app_role); "
                f"run 'vecpipe migrate' as this user, or GRANT {role} TO it."
            ) from None
        _set_local(conn, {"vecpipe.tenant": tenant})

    def _choose(self, conn: psycopg.Connection[Any], compiled: CompiledFilter,
                params: dict[str, Any], k: int, ef_search: int | None,
                strategy: str) -> tuple[Strategy, list[str] | None]:
        """Pick the strategy (through the owner's functions: under row-level security the
        planner could neither estimate the tenant nor use GIN for the filters).

        Returns the strategy and, for an exact scan of a filtered big tenant, the addresses of
        the matching rows.
        """
        p = self.policy
        limit = p.exact_max_rows
        filtered = not compiled.empty
        if strategy == "exact":
            return Strategy("exact", settings=_EXACT, reason="asked for"), None
        # The planner's statistics: free, and good enough to tell a big tenant from a small one.
        row = conn.execute(sql.SQL("SELECT tenant_rows, total_rows FROM {}.tenant_estimate()")
                           .format(self._schema), prepare=False).fetchone()
        estimate, total = (int(row[0]), max(int(row[1]), 1)) if row else (0, 1)
        if strategy == "auto" and estimate <= 4 * limit:
            # Counted exactly up to the limit: an index-only scan of the primary key.
            counted = _scalar(conn, sql.SQL("SELECT count(*) FROM {}.tenant_rows(%(cap)s)")
                              .format(self._schema), {"cap": limit + 1})
            if counted <= limit:
                return Strategy("exact", counted, True, settings=_EXACT,
                                reason=f"the tenant has at most {limit} rows"), None
            estimate = max(estimate, counted)
        if strategy == "auto" and filtered:
            # A big tenant and filters: the matching rows' addresses, at most limit + 1 of them,
            # found with GIN and the primary key.
            found = [r[0] for r in conn.execute(sql.SQL(
                "SELECT r::text FROM {}.tenant_rows(%(cap)s, %(contain)s, %(path)s) AS r")
                .format(self._schema), {**params, "cap": limit + 1}, prepare=False)]
            if len(found) <= limit:
                return Strategy("exact", len(found), True, settings=_BY_ADDRESS,
                                reason=f"the filters match at most {limit} rows"), found
        index = self._index_name()
        if index is None:
            return Strategy("exact", estimate, settings=_EXACT, reason="no vector index"), None
        # Filters above the limit: at least limit + 1 of the tenant's rows match.
        matching = estimate if not filtered else min(estimate, limit + 1)
        if strategy in ("auto", "tenant_index"):
            tindex = tenant_index_name(index, str(params["tenant"]))
            if index_state(conn, self.cfg.database.schema, tindex) == "valid":
                # In the tenant's own graph only the filters thin the neighbours out.
                within = matching / max(estimate, 1)
                return Strategy("tenant_index", matching, False, tindex,
                                self._ann_settings(within, k, ef_search),
                                reason="the tenant has its own index"), None
            if strategy == "tenant_index":
                raise SearchError(
                    f"Tenant {params['tenant']!r} has no valid partial index {tindex}; create "
                    f"it with 'vecpipe index create --tenant {params['tenant']}', or use "
                    "another strategy."
                )
        share = min(1.0, max(matching, 1) / total)
        return Strategy("shared_index", matching, False, index,
                        self._ann_settings(share, k, ef_search),
                        reason=f"tenant and filters select {share:.2%} of the table"), None

    def _ann_settings(self, share: float, k: int, ef_search: int | None) -> dict[str, str]:
        """Iterative-scan settings for a query whose matches are ``share`` of the index's rows.

        The search list must hold enough matching neighbours: ef_search grows as the square root
        of the inverse share (measured: enough for recall@10 >= 0.9 at a 1% share), and the scan
        may visit about 50 / share tuples before giving up.
        """
        p, v = self.policy, self.cfg.vector
        base = ef_search or v.ef_search
        if v.index == "ivfflat":
            probes = min(v.ivfflat_lists, max(v.ivfflat_probes,
                                               math.ceil(v.ivfflat_probes / math.sqrt(share))))
            return {**_ANN, "ivfflat.probes": str(probes),
                    "ivfflat.iterative_scan": p.iterative_scan,
                    "ivfflat.max_probes": str(v.ivfflat_lists)}
        ef = min(p.max_ef_search, max(base, k, math.ceil(base / math.sqrt(share))))
        if ef_search:
            ef = max(ef_search, k)  # asked for explicitly: as given
        tuples = min(p.max_scan_tuples_cap, max(p.min_scan_tuples, math.ceil(50 * k / share)))
        return {**_ANN, "hnsw.ef_search": str(ef), "hnsw.iterative_scan": p.iterative_scan,
                "hnsw.max_scan_tuples": str(tuples)}

    def _index_name(self) -> str | None:
        return None if self.cfg.vector.index == "none" else index_name(self.cfg)

    def _where(self, compiled: CompiledFilter, literal_tenant: str | None) -> sql.Composable:
        # The tenant as a literal when a partial index must be provably usable: with a parameter,
        # a generic plan could not match the index's predicate.
        tenant: sql.Composable = (sql.Literal(literal_tenant) if literal_tenant is not None
                                  else sql.SQL("%(tenant)s"))
        where: list[sql.Composable] = [sql.SQL("tenant_id = {}").format(tenant)]
        if compiled.contain:
            where.append(sql.SQL("metadata @> %(contain)s"))
        if compiled.path is not None:
            where.append(sql.SQL("metadata @@ %(path)s::jsonpath"))
        return sql.SQL(" AND ").join(where)

    def _statement(self, chosen: Strategy, compiled: CompiledFilter, by_address: bool,
                   tenant: str) -> sql.Composed:
        where = self._where(compiled, tenant if chosen.kind == "tenant_index" else None)
        if by_address:
            where = sql.SQL("ctid = ANY (%(ctids)s::tid[]) AND {}").format(where)
        distance = sql.SQL("embedding {} %(q)s").format(self._op)
        return sql.SQL(
            "SELECT ctid::text, {columns} FROM {schema}.chunks WHERE {where}"
            " ORDER BY {distance} LIMIT %(k)s"
        ).format(columns=self._columns(distance), schema=self._schema, where=where,
                 distance=distance)


def fuse(near: list[Hit], matched: list[Hit], k: int, rrf_k: int = 60) -> list[Hit]:
    """Reciprocal rank fusion: each hit scores the sum of 1 / (rrf_k + rank) over the lists it
    is in (rank from 1), so agreement between the lists wins and neither list's raw scores,
    on different scales, need calibrating. Ties go to the nearer vector, then to the key."""
    fused: dict[tuple[str, int], tuple[float, Hit]] = {}
    for ranked in (near, matched):
        for rank, hit in enumerate(ranked, 1):
            key = (hit.doc_id, hit.chunk_index)
            score, first = fused.get(key, (0.0, hit))
            if first.distance is None and hit.distance is not None:
                first = hit
            fused[key] = (score + 1.0 / (rrf_k + rank), first)
    order = sorted(fused.values(), key=lambda sh: (
        -sh[0], math.inf if sh[1].distance is None else sh[1].distance, sh[1].doc_id,
        sh[1].chunk_index))
    return [replace(hit, score=score) for score, hit in order[:k]]


def _set_local(conn: psycopg.Connection[Any], settings: Mapping[str, str]) -> None:
    """set_config(..., true) is SET LOCAL; all of them in one round trip."""
    if not settings:
        return
    conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, true)").format(sql.Literal(n), sql.Literal(v))
        for n, v in settings.items())), prepare=False)


# An exact scan must not walk the ANN index (approximate, and filtered after the walk): with index
# scans off, the rows come from a TID or bitmap scan and are sorted by distance.
_EXACT: Mapping[str, str] = {"enable_indexscan": "off"}
# Rows named by address: nothing but a TID scan (a large ctid = ANY (...) as a filter would be
# searched linearly for every row).
_BY_ADDRESS: Mapping[str, str] = {"enable_indexscan": "off", "enable_bitmapscan": "off",
                                  "enable_seqscan": "off"}
# The other way round: once the rule chose the ANN index, a plan that reads the tenant through
# the primary key and sorts it (exact, but as slow as the tenant is big) is not wanted.
_ANN: Mapping[str, str] = {"enable_sort": "off"}


def _scalar(conn: psycopg.Connection[Any], query: sql.Composed,
            params: Mapping[str, Any]) -> int:
    row = conn.execute(query, params, prepare=False).fetchone()
    assert row is not None
    return int(row[0])


def _clip(line: str, width: int = 400) -> str:
    """Plan lines with a whole query vector or thousands of row addresses, shortened."""
    if len(line) <= width:
        return line
    return f"{line[:width]}... ({len(line) - width} more characters)"
