"""Smoke test of `vecpipe bench write` on the real broker and database (no timing is asserted)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.helpers import connect, run_cli

pytestmark = pytest.mark.integration


def test_bench_write_prints_one_json_report_and_leaves_nothing_behind(cfg: Any) -> None:
    """A tiny write benchmark reports both ratios with targets, and drops its own schemas."""
    proc = run_cli(cfg, "bench", "write", "--rows", "500", "--hnsw-rows", "100", "--json",
                   timeout=120)
    report = json.loads(proc.stdout)
    assert report["benchmark"] == "write"
    assert report["services"]["source"] == "configured"
    for key in ("cpu_count", "cpu_model", "load_avg_start", "load_avg_end", "torch_threads"):
        assert key in report["machine"]
    write = report["write"]
    for key in ("pipeline_per_s", "limit_per_s", "ratio", "pipeline_hnsw_per_s",
                "limit_hnsw_per_s", "ratio_hnsw"):
        assert isinstance(write[key], int | float) and write[key] > 0, key
    assert set(write["target"]) == {"ratio", "ratio_hnsw"}
    assert all(isinstance(v, bool) for v in write["meets_target"].values())
    assert write["worker"]["dead_letters"] == 0
    assert report["sizes"]["rows"] == 500
    assert "[bench write" in proc.stderr  # progress goes to stderr, the report alone to stdout
    used = re.findall(r"namespace (bench_[0-9a-f]+(?:_h)?):", proc.stderr)
    assert len(used) == 2, proc.stderr
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                            (used,)).fetchall()
    assert left == []


def test_bench_spike_reports_both_profiles_and_puts_the_settings_back(cfg: Any) -> None:
    """A tiny spike benchmark: both profiles' idle and during-ingest latencies and ingest rates,
    the two ratios with targets; ALTER SYSTEM is reset and its schemas are dropped."""
    def altered() -> set[str]:
        with connect(cfg.database, vector_types=False, autocommit=True) as conn:
            return {r[0] for r in conn.execute(
                "SELECT name FROM pg_settings WHERE source = 'configuration file'"
                " AND sourcefile LIKE '%%postgresql.auto.conf'")}

    before = altered()
    proc = run_cli(cfg, "bench", "spike", "--rows", "240", "--base", "400", "--qps", "20",
                   "--idle-s", "1", "--json", timeout=300)
    spike = json.loads(proc.stdout)["spike"]
    for profile in ("defaults", "tuned"):
        figures = spike[profile]
        assert figures["ingest_rows_per_s"] > 0
        assert figures["idle"]["n"] >= 10 and figures["during_ingest"]["n"] >= 1
        assert figures["p99_ratio"] > 0
    assert spike["defaults"]["settings"]["checkpoint_timeout"] == "5min"
    assert spike["tuned"]["pause_ratio"] == 0.1
    assert set(spike["target"]) == {"p99_ratio", "ingest_ratio"}
    assert altered() == before
    used = re.findall(r"namespace (bench_[0-9a-f]+_[dt]):", proc.stderr)
    assert len(used) == 2, proc.stderr
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        assert conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                            (used,)).fetchall() == []
