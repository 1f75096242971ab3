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
