"""Unit tests of the benchmarks' pure helpers: percentiles, recall, targets, synthetic vectors."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from vecpipe.bench.registry import summary_lines
from vecpipe.bench.stats import (
    Target,
    cluster_centers,
    clustered_unit_vectors,
    exact_top_k,
    latency_summary,
    percentile,
    random_unit_vectors,
    rate,
    ratio,
    recall_at_k,
    split_halves,
)
from vecpipe.bench.write import CHUNKS_PER_DOC, synthetic_rows
from vecpipe.cli.bench import register
from vecpipe.messages import EMBEDDING, Embedding, decode, schema_headers


def test_percentile_interpolates_like_numpy() -> None:
    """Linear interpolation between closest ranks, numpy's default, for any q."""
    values = [7.0, 1.0, 3.0, 10.0, 4.0, 2.5]
    for q in (0, 10, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_one_value_and_bad_input() -> None:
    """One value is every percentile; no values or q outside 0..100 are refused."""
    assert percentile([4.2], 99) == 4.2
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_reports_milliseconds() -> None:
    """Seconds in, milliseconds out, with the sample count."""
    summary = latency_summary([0.001 * i for i in range(1, 101)])
    assert summary["n"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["max_ms"] == pytest.approx(100.0)
    assert latency_summary([]) == {"n": 0}


def test_recall_counts_overlap_with_the_exact_top_k() -> None:
    """Order inside the top k does not matter; misses lower recall; extra results are ignored."""
    truth = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert recall_at_k([[4, 3, 2, 1], [8, 7, 6, 5]], truth, 4) == 1.0
    assert recall_at_k([[1, 2, 9, 9], [5, 6, 7, 8]], truth, 4) == pytest.approx(0.75)
    # Only the first k results count.
    assert recall_at_k([[9, 9, 1, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 0.5


def test_recall_with_short_truth_and_bad_input() -> None:
    """A tenant with fewer than k rows is judged on what exists; mismatched lists are refused."""
    assert recall_at_k([[1, 2]], [[1, 2]], 10) == 1.0
    assert recall_at_k([[]], [[]], 10) == 1.0
    with pytest.raises(ValueError):
        recall_at_k([[1]], [[1], [2]], 1)


def test_exact_top_k_ranks_by_cosine_and_l2() -> None:
    """The brute-force ground truth returns nearest first, across block boundaries."""
    data = random_unit_vectors(500, 16, seed=3)
    queries = data[[10, 200, 499]] + 0.01
    top = exact_top_k(data, queries, 5, "cosine", block=64)
    assert [t[0] for t in top] == [10, 200, 499]
    sims = (data @ (queries[0] / np.linalg.norm(queries[0])))
    assert top[0] == list(np.argsort(-sims)[:5])
    assert [t[0] for t in exact_top_k(data, queries, 3, "l2", block=100)] == [10, 200, 499]
    assert exact_top_k(data[:2], queries, 5)[0] in ([0, 1], [1, 0])


def test_random_unit_vectors_have_unit_norm_and_are_reproducible() -> None:
    """Unit length, float32, same seed same vectors."""
    v = random_unit_vectors(50, 384, seed=1)
    assert v.dtype == np.float32 and v.shape == (50, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v, random_unit_vectors(50, 384, seed=1))


def test_clustered_vectors_gather_around_their_centres() -> None:
    """Each point is nearer its own centre than others; spread sets the cosine to it."""
    centers = cluster_centers(8, 64, seed=5)
    vecs, labels = clustered_unit_vectors(400, 64, 8, spread=1.0, seed=5)
    assert vecs.shape == (400, 64) and labels.shape == (400,)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ centers.T
    assert (np.argmax(sims, axis=1) == labels).mean() > 0.95
    own = sims[np.arange(400), labels]
    assert abs(float(own.mean()) - 1 / math.sqrt(2)) < 0.05
    # Queries drawn with the data's centres come from the same distribution.
    queries, q_labels = clustered_unit_vectors(20, 64, 8, seed=6, centers=centers)
    assert (np.argmax(queries @ centers.T, axis=1) == q_labels).mean() > 0.9
    with pytest.raises(ValueError):
        clustered_unit_vectors(10, 64, 0)


def test_targets_compare_and_print() -> None:
    """A target says whether a figure meets it; None and NaN never do."""
    assert Target(">=", 0.9).met(0.9) and not Target(">=", 0.9).met(0.89)
    assert Target("<", 10).met(9.99) and not Target("<", 10).met(10)
    assert Target("<=", 0.05).met(0.05)
    assert not Target(">=", 0.9).met(None) and not Target(">=", 0.9).met(float("nan"))
    assert str(Target(">=", 0.9)) == ">= 0.9"
    with pytest.raises(ValueError):
        Target("==", 1)


def test_rates_ratios_and_halves() -> None:
    """Throughput and ratios guard against zero; the halves cover every item once."""
    assert rate(100, 4.0) == 25.0 and rate(5, 0.0) == 0.0
    assert ratio(45.0, 50.0) == 0.9 and ratio(1.0, 0.0) == 0.0
    first, second = split_halves(7)
    assert list(range(7))[first] + list(range(7))[second] == list(range(7))


def test_synthetic_rows_are_valid_embedding_messages() -> None:
    """The writer benchmark's input decodes with the real contract, one document per 8 chunks."""
    rows = synthetic_rows(20, 8, "bench", seed=2)
    messages = rows.messages("float32")
    decoded = [decode(m, schema_headers(EMBEDDING)) for m in messages]
    assert all(isinstance(d, Embedding) for d in decoded)
    first = decoded[0]
    assert isinstance(first, Embedding)
    assert first.chunk.chunk_count == CHUNKS_PER_DOC
    assert np.allclose(first.vector, rows.vectors[0])
    last = decoded[-1]
    assert isinstance(last, Embedding)
    assert last.chunk.chunk_count == 20 - 2 * CHUNKS_PER_DOC
    assert len(rows.copy_rows(halfvec=False)[0]) == 16


def _report() -> dict[str, object]:
    return {
        "benchmark": "write",
        "machine": {"cpu_count": 2, "cpu_model": "x", "load_avg_start": [1.0],
                    "load_avg_end": [1.5]},
        "services": {"source": "local"},
        "write": {"ratio": 0.7, "ratio_hnsw": 0.5, "worker": {"batches": 3},
                  "target": {"ratio": ">= 0.6", "ratio_hnsw": ">= 0.9"},
                  "meets_target": {"ratio": True, "ratio_hnsw": False}},
        "elapsed_s": 1.0,
    }


def test_summary_marks_targets_met_and_missed() -> None:
    """The readable output names each target and whether it was met."""
    lines = summary_lines(_report())
    assert any("ratio = 0.7" in ln and "met" in ln and "MISSED" not in ln for ln in lines)
    assert any("ratio_hnsw = 0.5" in ln and "MISSED" in ln for ln in lines)
    assert any("worker.batches = 3" in ln for ln in lines)


def test_cli_parses_each_benchmark_with_defaults() -> None:
    """`vecpipe bench NAME` exists for the five benchmarks with the documented defaults."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    register(parser.add_subparsers(dest="command"))
    embed = parser.parse_args(["bench", "embed", "--backend", "onnx-int8", "--json"])
    assert (embed.benchmark, embed.chunks, embed.backend, embed.json) == (
        "embed", 1000, "onnx-int8", True)
    write = parser.parse_args(["bench", "write", "--rows", "500"])
    assert (write.rows, write.hnsw_rows) == (500, None)
    search = parser.parse_args(["bench", "search", "--ef-search", "10,20"])
    assert (search.rows, search.ef_search) == (100_000, [10, 20])
    e2e = parser.parse_args(["bench", "e2e"])
    assert (e2e.chunks, e2e.rate, e2e.latency_docs) == (500, 1.0, 30)
    assert parser.parse_args(["bench", "reingest"]).chunks == 500
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "search", "--ef-search", "0"])
