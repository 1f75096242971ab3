"""Capacity planning: the disk a chunks table of N rows takes, from PostgreSQL's page layout.

The estimate follows what the server does byte by byte, for 8 kB pages: a heap tuple is a 24-byte
header and its columns at their alignment; a page holds what fits in 8,168 bytes, 4 bytes of line
pointer per tuple. A row over 2,032 bytes is toasted: its text is compressed if it compresses
(``text_compression``), and moved to the TOAST table if the row is still too big (the embedding
stays inline: the migration sets its STORAGE PLAIN), in chunks of at most 1,996 bytes. B-tree
entries are an 8-byte header and the keys; leaves are about 70% full when rows arrive in random
key order. HNSW keeps each element (72 bytes and the vector) next to its neighbour list ((level
+ 2) x m item pointers of 6 bytes), levels drawn as pgvector draws them; IVFFlat keeps the vectors
as index tuples, each list on its own pages.

Checked against ``pg_relation_size`` on real tables by tests/integration/test_database.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vecpipe.errors import PlanError

__all__ = ["Estimate", "Workload", "estimate", "format_bytes",
           "vector_index_bytes"]

BLCKSZ = 8192
PAGE_HEADER = 24
ITEM_ID = 4
HEAP_TUPLE_HEADER = 24  # 23 bytes, MAXALIGNed; rows have no NULLs
HEAP_USABLE = BLCKSZ - PAGE_HEADER  # 8168
MAX_HEAP_TUPLE = BLCKSZ - 32  # MaxHeapTupleSize: 8160
MAX_TUPLES_PER_PAGE = 291
TOAST_THRESHOLD = 2032  # a tuple longer than this is toasted, down to this target
TOAST_CHUNK = 1996  # TOAST_MAX_CHUNK_SIZE
TOAST_POINTER = 18
PGLZ_MIN_SAVING = 0.25  # pglz gives up unless it saves a quarter
BTREE_USABLE = BLCKSZ - PAGE_HEADER - 16  # 16 bytes of BTPageOpaqueData
VECTOR_AM_USABLE = BLCKSZ - PAGE_HEADER - 8  # HNSW and IVFFlat page opaque data: 8 bytes
HNSW_ELEMENT_HEADER = 72  # type, level, deleted, version, 10 heap TIDs, neighbour TID, unused
HNSW_MAX_LEVEL = 10
GIN_PENDING_LIMIT = 4 * 1024 * 1024


def maxalign(n: int) -> int:
    """Round up to 8 bytes, PostgreSQL's MAXALIGN."""
    return (n + 7) & ~7


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def format_bytes(n: float) -> str:
    """1536 -> '1.5 kB' (powers of 1024, as pg_size_pretty)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Workload:
    """What is stored: rows, vectors, index, and the typical size of each column's value.

    Text sizes are bytes of UTF-8 (``octet_length``); ``metadata_bytes`` is the stored size
    ``pg_column_size(metadata)`` reports; ``text_compression`` is compressed / raw size of the
    content under pglz (1.0: does not compress; English prose is typically 0.5 to 0.7; measure
    with ``avg(pg_column_size(content)::float / octet_length(content))`` on toasted rows).
    """

    rows: int
    dimension: int
    column_type: str = "vector"
    index: str = "hnsw"
    m: int = 16
    lists: int = 100
    text_bytes: int = 800
    text_compression: float = 1.0
    tenant_bytes: int = 8
    doc_id_bytes: int = 24
    source_uri_bytes: int = 40
    metadata_bytes: int = 32
    metadata_values: int = 2
    model_name_bytes: int = 16
    model_revision_bytes: int = 40
    model_backend_bytes: int = 10
    # The full-text column (0009): its stored size per byte of text (English prose measured
    # 0.88 on 800-byte chunks), and distinct lexemes a chunk (0: about one per 12 bytes).
    tsv_ratio: float = 0.88
    text_lexemes: int = 0
    btree_fill: float = 0.7

    def check(self) -> None:
        """Raise :class:`PlanError` for values that describe no table."""
        if self.rows < 0:
            raise PlanError(f"--rows must be 0 or more, got {self.rows}.")
        if not 1 <= self.dimension <= 16000:
            raise PlanError(f"--dim must be between 1 and 16000, got {self.dimension}.")
        if self.column_type not in ("vector", "halfvec"):
            raise PlanError(f"--type must be vector or halfvec, got {self.column_type!r}.")
        if self.index not in ("hnsw", "ivfflat", "none"):
            raise PlanError(f"--index must be hnsw, ivfflat or none, got {self.index!r}.")
        if self.m < 2 or self.lists < 1:
            raise PlanError(f"--m must be at least 2 and --lists at least 1, got {self.m} and "
                            f"{self.lists}.")
        if not 0 < self.text_compression <= 1:
            raise PlanError("--text-compression must be in (0, 1], got "
                            f"{self.text_compression}.")
        if not 0 <= self.tsv_ratio <= 4 or self.text_lexemes < 0:
            raise PlanError(f"--tsv-ratio must be in [0, 4] and --text-lexemes 0 or more, got "
                            f"{self.tsv_ratio} and {self.text_lexemes}.")
        if not 0.3 <= self.btree_fill <= 1:
            raise PlanError(f"--btree-fill must be in [0.3, 1], got {self.btree_fill}.")

    @property
    def vector_bytes(self) -> int:
        """The stored size of one vector: 8 bytes of header, then 4 (or 2) bytes a dimension."""
        return 8 + (4 if self.column_type == "vector" else 2) * self.dimension


@dataclass(frozen=True)
class Estimate:
    """Bytes on disk, by relation (main forks; free-space and visibility maps separately)."""

    workload: Workload
    heap_bytes: int
    heap_tuple_bytes: int
    rows_per_page: int
    content_storage: str
    toast_bytes: int
    toast_index_bytes: int
    maps_bytes: int
    primary_key_bytes: int
    content_hash_index_bytes: int
    metadata_index_bytes: int
    text_index_bytes: int
    vector_index_bytes: int
    hnsw_build_memory_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def indexes_bytes(self) -> int:
        """What pg_indexes_size(chunks) reports: every index of the table, not TOAST's."""
        return (self.primary_key_bytes + self.content_hash_index_bytes
                + self.metadata_index_bytes + self.text_index_bytes
                + self.vector_index_bytes)

    @property
    def table_bytes(self) -> int:
        """What pg_table_size(chunks) reports: heap, TOAST (with its index) and the maps."""
        return self.heap_bytes + self.toast_bytes + self.toast_index_bytes + self.maps_bytes

    @property
    def total_bytes(self) -> int:
        """What pg_total_relation_size(chunks) reports."""
        return self.table_bytes + self.indexes_bytes

    def report(self) -> list[str]:
        """The estimate as lines of text for people."""
        w = self.workload
        rows = [
            ("heap", self.heap_bytes,
             f"{self.heap_tuple_bytes} bytes a row, {self.rows_per_page} rows a page; "
             f"content {self.content_storage}"),
            ("TOAST (text, full text moved out of line)", self.toast_bytes + self.toast_index_bytes,
             "with its index"),
            ("free-space and visibility maps", self.maps_bytes, "after VACUUM"),
            ("primary key (btree)", self.primary_key_bytes, f"leaves {w.btree_fill:.0%} full"),
            ("content_hash index (btree)", self.content_hash_index_bytes, ""),
            ("metadata index (GIN, jsonb_path_ops)", self.metadata_index_bytes, "approximate"),
            ("full-text index (GIN, content_tsv)", self.text_index_bytes, "approximate"),
            (f"vector index ({w.index})", self.vector_index_bytes,
             {"hnsw": f"m={w.m}", "ivfflat": f"lists={w.lists}", "none": "none"}[w.index]),
        ]
        out = [f"{w.rows:,} rows of {w.column_type}({w.dimension}), {w.text_bytes}-byte text"]
        for label, size, note in rows:
            out.append(f"  {label:<38} {format_bytes(size):>10}  {note}".rstrip())
        out.append(f"  {'table (pg_table_size)':<38} {format_bytes(self.table_bytes):>10}")
        out.append(f"  {'indexes (pg_indexes_size)':<38} {format_bytes(self.indexes_bytes):>10}")
        out.append(f"  {'total (pg_total_relation_size)':<38} {format_bytes(self.total_bytes):>10}")
        if w.index == "hnsw":
            out.append(f"  maintenance_work_mem for an in-memory HNSW build: about "
                       f"{format_bytes(self.hnsw_build_memory_bytes)}")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


# -- heap and TOAST -------------------------------------------------------------------------------

def _short(payload: int) -> int:
    """Stored size of a packable varlena: 1-byte header up to 126 bytes, else 4 (unaligned)."""
    return payload + 1 if payload <= 126 else payload + 4


# A column of the chunks table: name, and for a fixed-width one (size, alignment), for a varlena
# its payload bytes and whether TOAST may touch it (False: STORAGE PLAIN).
_Column = tuple[str, int, int, bool]


def _columns(w: Workload) -> list[_Column]:
    """The chunks table's columns in order (0002): (name, bytes, fixed alignment or 0, toastable).

    Fixed-width columns have their alignment; varlena ones 0 and their payload (no header).
    """
    meta = max(w.metadata_bytes - 1, 1) if w.metadata_bytes <= 127 else w.metadata_bytes - 4
    return [
        ("tenant_id", w.tenant_bytes, 0, True), ("doc_id", w.doc_id_bytes, 0, True),
        ("chunk_index", 4, 4, False), ("doc_version", 8, 8, False), ("chunk_count", 4, 4, False),
        ("content_hash", 32, 0, True), ("content", w.text_bytes, 0, True),
        ("char_start", 4, 4, False), ("char_end", 4, 4, False),
        ("source_uri", w.source_uri_bytes, 0, True), ("metadata", meta, 0, True),
        ("embedding", w.vector_bytes - 4, 0, False),
        ("model_name", w.model_name_bytes, 0, True),
        ("model_revision", w.model_revision_bytes, 0, True),
        ("model_backend", w.model_backend_bytes, 0, True),
        ("embedded_at", 8, 8, False), ("written_at", 8, 8, False),
        ("content_tsv", max(round(w.tsv_ratio * w.text_bytes) - 4, 1), 0, True),
    ]


def _data_size(cols: list[_Column], state: dict[str, str], compressed: dict[str, int]) -> int:
    """Bytes after the tuple header, as heap_compute_data_size counts them."""
    off = 0
    for name, size, align, toastable in cols:
        if align:
            off = _align(off, align) + size
        elif state.get(name) == "external":
            off += TOAST_POINTER  # a 1-byte-header datum: no alignment
        elif state.get(name) == "compressed":
            off = _align(off, 4) + 8 + compressed[name]
        elif toastable and size <= 126:
            off += size + 1  # converted to a short (1-byte) header, unaligned
        else:
            off = _align(off, 4) + 4 + size
    return off


def _toast(w: Workload) -> tuple[int, dict[str, str], list[int]]:
    """(heap tuple length, what happened to each column, bytes each moved column puts in TOAST).

    As heap_toast_insert_or_update: while the row is over the target, compress the largest
    extended column (only the text is assumed to compress); then move the largest ones out of
    line, whatever they are, as long as they are bigger than a TOAST pointer. A large PLAIN
    vector can so push every middling text column out of line.
    """
    cols = _columns(w)
    state: dict[str, str] = {}
    compressed: dict[str, int] = {}
    length = HEAP_TUPLE_HEADER + _data_size(cols, state, compressed)
    if length <= TOAST_THRESHOLD:
        return length, state, []
    target = TOAST_THRESHOLD - HEAP_TUPLE_HEADER
    candidates = {name: size for name, size, align, toastable in cols if toastable and not align}

    def varsize(name: str) -> int:
        return 8 + compressed[name] if name in compressed else 4 + candidates[name]

    tried: set[str] = set()
    while _data_size(cols, state, compressed) > target:
        left = [n for n in candidates if n not in tried and varsize(n) > maxalign(TOAST_POINTER)]
        if not left:
            break
        name = max(left, key=varsize)  # the first of equals, as the server's strict '>'
        tried.add(name)
        if (name == "content" and candidates[name] >= 32
                and w.text_compression <= 1 - PGLZ_MIN_SAVING):
            compressed[name] = math.ceil(candidates[name] * w.text_compression) + 4
            state[name] = "compressed"
            if varsize(name) > target:
                state[name] = "external"
    while _data_size(cols, state, compressed) > target:
        left = [n for n in candidates if state.get(n) != "external"
                and varsize(n) > maxalign(TOAST_POINTER)]
        if not left:
            break
        state[max(left, key=varsize)] = "external"
    moved = [compressed.get(n, candidates[n]) for n, s in state.items() if s == "external"]
    return HEAP_TUPLE_HEADER + _data_size(cols, state, compressed), state, moved


def _content_storage(state: dict[str, str]) -> str:
    where = state.get("content", "inline")
    return {"inline": "inline", "compressed": "compressed inline",
            "external": "in TOAST"}[where]


def _pages_for(item_bytes: int, items: int, usable: int, per_page_max: int | None = None,
               fill: float = 1.0) -> int:
    """Pages for ``items`` equal items of ``item_bytes`` (line pointer included)."""
    if items <= 0:
        return 0
    per_page = max(1, int(usable * fill) // item_bytes)
    if per_page_max is not None:
        per_page = min(per_page, per_page_max)
    return math.ceil(items / per_page)


def _toast_pages(rows: int, values: list[int]) -> tuple[int, int]:
    """(TOAST heap pages, TOAST chunks) for ``rows`` rows that each move ``values`` bytes."""
    sizes: list[int] = []
    for value in values:
        full, last = divmod(value, TOAST_CHUNK)
        sizes += [TOAST_CHUNK] * full + ([last] if last else [])
    if rows == 0 or not sizes:
        return 0, 0
    # chunk_id (oid), chunk_seq (int4), chunk_data (bytea, 4-byte header)
    tuples = [maxalign(HEAP_TUPLE_HEADER + 4 + 4 + 4 + s) + ITEM_ID for s in sizes]
    # Pages fill in insertion order (a new page when the next chunk does not fit).
    sample = min(rows, 2000)
    pages, free = 1, HEAP_USABLE
    for _ in range(sample):
        for t in tuples:
            if t > free:
                pages, free = pages + 1, HEAP_USABLE
            free -= t
    used = pages - 1 + (HEAP_USABLE - free) / HEAP_USABLE  # the last page counts as far as filled
    return math.ceil(used * rows / sample), rows * len(sizes)


def _maps_bytes(pages: int) -> int:
    """Free-space map (three pages at least) and visibility map, as VACUUM leaves them."""
    if pages == 0:
        return 0
    fsm_leaves = math.ceil(pages / 4000)
    fsm = 2 + fsm_leaves + math.ceil(fsm_leaves / 4000)
    vm = math.ceil(pages / 32672)
    return (fsm + vm) * BLCKSZ


# -- B-tree and GIN -----------------------------------------------------------------------------

def _btree_bytes(entries: int, entry: int, fill: float) -> int:
    """A B-tree of ``entries`` keys whose index tuples are ``entry`` bytes (MAXALIGNed)."""
    if entries == 0:
        return 2 * BLCKSZ
    per_leaf = max(2, int(BTREE_USABLE * fill) // (entry + ITEM_ID))
    level = math.ceil(entries / per_leaf)
    pages = 1 + level  # metapage
    # Inner pages hold (truncated) pivots, usually no bigger than the leaf tuples.
    per_inner = max(2, int(BTREE_USABLE * 0.9) // (entry + ITEM_ID))
    while level > 1:
        level = math.ceil(level / per_inner)
        pages += level
    return pages * BLCKSZ


def _gin_bytes(w: Workload, per_row: int | None = None) -> int:
    """GIN (jsonb_path_ops): one 4-byte hash per metadata value, TIDs in compressed posting lists.

    Rows inserted one by one go through the pending list first (20 bytes an entry, up to
    gin_pending_list_limit); VACUUM merges it and later inserts reuse about half of its pages,
    the rest stay in the file. ``per_row``: entries a row (default: its metadata values; the
    full-text index has one per distinct lexeme).
    """
    entries = w.rows * (w.metadata_values if per_row is None else per_row)
    postings = entries * 2  # varbyte-encoded TID deltas of dense lists: about 2 bytes each
    pending = min(GIN_PENDING_LIMIT, entries * 10)
    return 2 * BLCKSZ + _align(int(postings / 0.9) + pending, BLCKSZ)


# -- vector indexes -------------------------------------------------------------------------------

def _hnsw_levels(rows: int, m: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
    """Levels as pgvector draws them: floor(-ln(U) / ln(m)), capped; a fixed seed."""
    rng = np.random.default_rng(20240901)
    u = 1.0 - rng.random(rows)  # (0, 1]
    levels = np.floor(-np.log(u) / math.log(m)).astype(np.int64)
    return np.minimum(levels, HNSW_MAX_LEVEL)


def _hnsw_pages(rows: int, vector_bytes: int, m: int) -> int:
    """Graph pages as hnswbuild.c writes them: element and neighbours on one page if they fit."""
    if rows == 0:
        return 1
    sample = min(rows, 50_000)
    element = maxalign(HNSW_ELEMENT_HEADER + vector_bytes)
    pages, avail = 1, VECTOR_AM_USABLE
    for level in _hnsw_levels(sample, m).tolist():
        neighbours = maxalign(4 + (level + 2) * m * 6)
        # PageGetFreeSpace leaves room for one more line pointer.
        if avail - ITEM_ID < element + neighbours + ITEM_ID:
            pages, avail = pages + 1, VECTOR_AM_USABLE
        avail -= element + neighbours + 2 * ITEM_ID
    used = pages - 1 + (VECTOR_AM_USABLE - avail) / VECTOR_AM_USABLE
    return 1 + math.ceil(used * rows / sample)  # and the metapage


def _ivfflat_pages(rows: int, vector_bytes: int, lists: int) -> int:
    """Metapage, the list (centroid) pages, and each list's chain of entry pages."""
    center = maxalign(8 + vector_bytes) + ITEM_ID
    list_pages = _pages_for(center, lists, VECTOR_AM_USABLE)
    entry = maxalign(8 + vector_bytes) + ITEM_ID
    per_page = max(1, VECTOR_AM_USABLE // entry)
    # Lists are uneven; each starts a page, and its last page is on average half empty.
    entry_pages = rows / per_page + lists * (per_page - 1) / (2 * per_page)
    entry_pages = max(entry_pages, float(lists))
    return 1 + list_pages + math.ceil(entry_pages)


def vector_index_bytes(rows: int, dimension: int, column_type: str, index: str, m: int = 16,
                       lists: int = 100) -> int:
    """Expected size of a freshly built vector index (also used by ``vecpipe index stats``)."""
    vbytes = 8 + (4 if column_type == "vector" else 2) * dimension
    if index == "hnsw":
        return _hnsw_pages(rows, vbytes, m) * BLCKSZ
    if index == "ivfflat":
        return _ivfflat_pages(rows, vbytes, lists) * BLCKSZ
    return 0


def _hnsw_build_memory(rows: int, vector_bytes: int, m: int) -> int:
    """pgvector's in-memory graph: element struct, neighbour candidates (16 bytes each), value."""
    mean_level = 1 / (m - 1)
    per_element = 160 + vector_bytes + int((2 * m + m * mean_level) * 16)
    return rows * per_element


# -- the estimate ---------------------------------------------------------------------------------

def estimate(w: Workload) -> Estimate:
    """Sizes of the heap, TOAST, every index and the maps for workload ``w``."""
    w.check()
    notes: list[str] = []
    tuple_len, state, moved = _toast(w)
    if tuple_len > MAX_HEAP_TUPLE:
        raise PlanError(
            f"A row of {tuple_len} bytes does not fit in an 8 kB page (at most {MAX_HEAP_TUPLE}): "
            f"the {w.column_type}({w.dimension}) column is stored inline (STORAGE PLAIN); use "
            "halfvec or fewer dimensions."
        )
    rows_per_page = min(MAX_TUPLES_PER_PAGE, HEAP_USABLE // (maxalign(tuple_len) + ITEM_ID))
    heap_pages = math.ceil(w.rows / rows_per_page) if w.rows else 0
    toast_pages, toast_chunks = _toast_pages(w.rows, moved)
    # An empty TOAST table has an index of one (meta)page; a used one, a B-tree of 16-byte keys
    # filled left to right (90%).
    toast_index = _btree_bytes(toast_chunks, 16, 0.9) if toast_chunks else BLCKSZ
    # The full-text column is big by nature: it going out of line says nothing about the vector.
    others = sorted(n for n, s in state.items()
                    if s == "external" and n not in ("content", "content_tsv"))
    if "content" in state and state["content"] == "external":
        notes.append("the text is moved to the TOAST table: a search reads it only for the "
                     "rows it returns")
    if state.get("content_tsv") == "external":
        notes.append("the full-text column is moved to the TOAST table: a keyword search reads "
                     "it through its GIN index, a rank reads it for the rows matched")
    if others:
        notes.append(f"the inline vector leaves so little room that {', '.join(others)} also "
                     "move to TOAST; consider halfvec")
    # (tenant_id, doc_id, chunk_index): two short-header texts, then an aligned int4.
    pk_entry = maxalign(8 + _align(_short(w.tenant_bytes) + _short(w.doc_id_bytes), 4) + 4)
    hash_entry = maxalign(8 + 33)
    if w.index == "hnsw" and w.dimension > (2000 if w.column_type == "vector" else 4000):
        raise PlanError(f"HNSW indexes {w.column_type} of at most "
                        f"{2000 if w.column_type == 'vector' else 4000} dimensions.")
    vindex = vector_index_bytes(w.rows, w.dimension, w.column_type, w.index, w.m, w.lists)
    if w.index == "ivfflat" and w.rows and w.lists > w.rows:
        notes.append(f"more lists ({w.lists}) than rows: use about rows / 1000 lists "
                     "(sqrt(rows) above a million)")
    return Estimate(
        workload=w,
        heap_bytes=heap_pages * BLCKSZ,
        heap_tuple_bytes=tuple_len,
        rows_per_page=rows_per_page,
        content_storage=_content_storage(state),
        toast_bytes=toast_pages * BLCKSZ,
        toast_index_bytes=toast_index,
        maps_bytes=_maps_bytes(heap_pages) + _maps_bytes(toast_pages),
        primary_key_bytes=_btree_bytes(w.rows, pk_entry, w.btree_fill),
        content_hash_index_bytes=_btree_bytes(w.rows, hash_entry, w.btree_fill),
        metadata_index_bytes=_gin_bytes(w),
        text_index_bytes=_gin_bytes(w, w.text_lexemes or max(1, w.text_bytes // 12)),
        vector_index_bytes=vindex,
        hnsw_build_memory_bytes=_hnsw_build_memory(w.rows, w.vector_bytes, w.m),
        notes=notes,
    )
