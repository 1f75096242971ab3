"""Capacity planning and query planning without a database: the byte arithmetic of the chunks
table's pages, TOAST decisions, index sizes, and the search strategy's iterative-scan settings."""

from __future__ import annotations

from typing import Any

import pytest

from vecpipe.config import load_config, with_section
from vecpipe.db.indexes import tenant_index_name
from vecpipe.db.plan import BLCKSZ, Workload, estimate, format_bytes, maxalign, vector_index_bytes
from vecpipe.db.search import Searcher, SearchPolicy, Strategy
from vecpipe.errors import PlanError


def test_vector_384_row_is_1866_bytes_with_its_text_and_full_text_in_toast() -> None:
    """vector(384), 800 bytes of text and its full-text column: both go to TOAST (a pointer
    of 18 bytes each), 4 rows fit a page."""
    e = estimate(Workload(rows=20_000, dimension=384))
    assert e.heap_tuple_bytes == 1866
    assert e.content_storage == "in TOAST"
    assert e.rows_per_page == 4
    assert e.heap_bytes == 5000 * BLCKSZ
    assert e.toast_bytes > 2223 * BLCKSZ  # the text alone took 2,223 pages, 9 chunks a page
    assert any("full-text column" in n for n in e.notes)


def test_halfvec_384_keeps_its_text_inline() -> None:
    """halfvec(384) leaves room for 800 bytes of text in the row; with no full-text column
    nothing is toasted, with one the larger of the two moves out."""
    e = estimate(Workload(rows=20_000, dimension=384, column_type="halfvec", tsv_ratio=0.01))
    assert e.content_storage == "inline"
    assert e.heap_tuple_bytes < 2032
    assert e.toast_bytes == 0
    words = estimate(Workload(rows=20_000, dimension=384, column_type="halfvec", tsv_ratio=1.1))
    assert words.content_storage == "inline" and words.toast_bytes > 0


def test_compressible_text_stays_inline_compressed() -> None:
    """Text that pglz shrinks to a fifth keeps a vector(384) row under the TOAST threshold."""
    e = estimate(Workload(rows=1000, dimension=384, text_compression=0.2, tsv_ratio=0.01))
    assert e.content_storage == "compressed inline"
    assert e.heap_tuple_bytes == 2005  # 2,000, and a near-empty full-text column
    assert e.toast_bytes == 0
    # Compressed to 30% the row is still over 2,032 bytes: the compressed text moves out.
    assert estimate(Workload(rows=1000, dimension=384, text_compression=0.3,
                             tsv_ratio=0.01)).toast_bytes > 0


def test_large_plain_vectors_push_small_columns_out_of_line() -> None:
    """vector(1536) fills a row on its own: even the hash and ids move to TOAST, 1 row a page."""
    e = estimate(Workload(rows=1000, dimension=1536))
    assert e.rows_per_page == 1
    assert any("content_hash" in n and "doc_id" in n for n in e.notes)


def test_a_vector_too_big_for_a_page_is_a_plan_error() -> None:
    """A PLAIN column cannot exceed a page: the estimate says so in a sentence."""
    with pytest.raises(PlanError, match=r"does not fit in an 8 kB page.*halfvec"):
        estimate(Workload(rows=10, dimension=2100, index="none"))


def test_hnsw_page_layout() -> None:
    """HNSW: 4 elements of vector(384) per page (1616 + 200 bytes), 7 of halfvec(384)."""
    assert maxalign(72 + 1544) == 1616
    pages = vector_index_bytes(40_000, 384, "vector", "hnsw") // BLCKSZ
    assert 10_000 < pages < 10_700  # 4 a page, fewer where an element has upper levels
    half = vector_index_bytes(70_000, 384, "halfvec", "hnsw") // BLCKSZ
    assert 10_000 < half < 10_900


def test_ivfflat_page_layout() -> None:
    """IVFFlat: 5 vector(384) entries a page, plus half a page per list and the centroids."""
    pages = vector_index_bytes(20_000, 384, "vector", "ivfflat", lists=100) // BLCKSZ
    assert pages == 1 + 20 + 4000 + 40


def test_estimate_sums_are_what_postgres_functions_report() -> None:
    """total = table + indexes; indexes include every index of chunks, not TOAST's."""
    e = estimate(Workload(rows=100_000, dimension=768, column_type="halfvec", index="ivfflat",
                          lists=300))
    assert e.total_bytes == e.table_bytes + e.indexes_bytes
    assert e.indexes_bytes == (e.primary_key_bytes + e.content_hash_index_bytes
                               + e.metadata_index_bytes + e.text_index_bytes
                               + e.vector_index_bytes)
    assert "total (pg_total_relation_size)" in "\n".join(e.report())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rows", -1, "--rows"), ("dimension", 0, "--dim"), ("column_type", "float", "--type"),
    ("index", "btree", "--index"), ("text_compression", 0.0, "--text-compression"),
])
def test_bad_workloads_are_sentences(field: str, value: Any, message: str) -> None:
    """Each impossible value names its flag."""
    with pytest.raises(PlanError, match=message):
        estimate(Workload(**{"rows": 10, "dimension": 384, field: value}))


def test_format_bytes_is_like_pg_size_pretty() -> None:
    """Powers of 1024 with one decimal."""
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(1536) == "1.5 kB"
    assert format_bytes(3 * 2**30) == "3.0 GB"


# -- the search strategy's settings ---------------------------------------------------------------

def _searcher(**vector: Any) -> Searcher:
    cfg = with_section(load_config(environ={}), "vector", **vector) if vector else \
        load_config(environ={})
    return Searcher(cfg, pool=None)  # type: ignore[arg-type]


def test_iterative_scan_settings_grow_as_the_share_shrinks() -> None:
    """Smaller shares get a larger ef_search and more scan budget, within the caps."""
    s = _searcher()
    whole = s._ann_settings(1.0, 10, None)
    one_percent = s._ann_settings(0.01, 10, None)
    tiny = s._ann_settings(1e-6, 10, None)
    assert whole["hnsw.iterative_scan"] == "relaxed_order"
    assert int(whole["hnsw.ef_search"]) == 40
    assert int(one_percent["hnsw.ef_search"]) == 400
    assert int(one_percent["hnsw.max_scan_tuples"]) == 50_000
    assert int(tiny["hnsw.ef_search"]) == SearchPolicy().max_ef_search
    assert int(tiny["hnsw.max_scan_tuples"]) == SearchPolicy().max_scan_tuples_cap
    assert s._ann_settings(0.01, 10, 64)["hnsw.ef_search"] == "64"  # asked for: as given
    assert whole["enable_sort"] == "off"


def test_ivfflat_settings_raise_probes_with_iterative_scans() -> None:
    """IVFFlat queries get more probes for small shares and iterative scans."""
    s = _searcher(index="ivfflat", ivfflat_lists=200, ivfflat_probes=10)
    settings = s._ann_settings(0.04, 10, None)
    assert settings["ivfflat.iterative_scan"] == "relaxed_order"
    assert settings["ivfflat.probes"] == "50"
    assert settings["ivfflat.max_probes"] == "200"


def test_strategy_descriptions_and_tenant_index_names() -> None:
    """Strategies print in one line; tenant index names are short, stable identifiers."""
    line = Strategy("exact", 300, True, settings={"enable_indexscan": "off"},
                    reason="the tenant has at most 5000 rows").describe()
    assert line == "exact, 300 rows, enable_indexscan=off (the tenant has at most 5000 rows)"
    name = tenant_index_name("chunks_embedding_hnsw_cosine", "acme/ünïcode tenant")
    assert name == tenant_index_name("chunks_embedding_hnsw_cosine", "acme/ünïcode tenant")
    assert len(name) <= 63 and name.isascii() and name.replace("_", "").isalnum()
