"""Operating a worker: health and metrics endpoints, graceful SIGTERM, logs, status."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from producers.publisher import Publisher
from tests.helpers import env_for, read_topic, run_cli, run_stage
from vecpipe.kafka.admin import offsets_committed
from vecpipe.messages import Document

pytestmark = pytest.mark.integration


def free_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> tuple[int, str]:
    """HTTP GET: status and body (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true or fail saying ``what`` never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_serves_health_and_metrics_and_drains_on_sigterm(migrated: Any) -> None:
    """Readiness after assignment, metrics while working, and SIGTERM exits 0 with commits."""
    cfg = migrated
    docs = {f"d{i}": f"document {i} about operations and graceful shutdown" for i in range(30)}
    with Publisher(cfg) as pub:
        for doc_id, text in docs.items():
            pub.publish(Document("default", doc_id, text, version=1))
    port = free_port()
    env = env_for(cfg)
    env["VECPIPE_DATABASE_URL"] = cfg.database.url.replace("postgres@", "postgres:s3cr3t-pw@")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vecpipe.cli", "embed", "--metrics-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(f"{base}/readyz")[0] == 200, 120, "readiness")
        assert get(f"{base}/healthz")[0] == 200
        def counted() -> bool:
            body = get(f"{base}/metrics")[1]
            # The loop observes a batch's duration once it collected it, just after the count.
            return ('vecpipe_messages_total{outcome="ok",stage="embed"} 30.0' in body
                    and 'vecpipe_batch_seconds_count{stage="embed"} 0.0' not in body)

        wait_for(counted, 120, "30 chunks counted in /metrics")
        metrics = get(f"{base}/metrics")[1]
        for name in ("vecpipe_batch_seconds_bucket", "vecpipe_encode_seconds_count",
                     "vecpipe_batch_size_count", "vecpipe_dead_letters_total"):
            assert name in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    committed = offsets_committed(cfg.kafka, cfg.kafka.embed_group, cfg.kafka.chunks_topic)
    assert sum(committed.values()) == 30
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = {e["event"] for e in events}
    assert {"worker_started", "partitions_assigned", "worker_stopped"} <= names
    assert all(e.get("stage") == "embed" and e.get("worker_id") for e in events)
    assert "s3cr3t-pw" not in err + out


def test_sigterm_in_the_middle_of_an_ingest_loses_nothing(migrated: Any, encoder: Any) -> None:
    """A worker stopped by SIGTERM mid-ingest, then restarted, leaves every chunk embedded."""
    cfg = migrated
    docs = {f"d{i}": f"chunk text number {i}, with a few more words to embed" for i in range(200)}
    with Publisher(cfg) as pub:
        for doc_id, text in docs.items():
            pub.publish(Document("default", doc_id, text, version=1))
    env = env_for(cfg)
    env["VECPIPE_EMBED_BATCH_SIZE"] = "16"
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "embed"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def some_embedded() -> bool:
        return len(read_topic(cfg, cfg.kafka.embeddings_topic, timeout=2)) >= 16

    try:
        wait_for(some_embedded, 180, "a first batch on the embeddings topic")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert run_stage("embed", cfg, encoder=encoder) == 0
    keys = {m.key() for m in read_topic(cfg, cfg.kafka.embeddings_topic)}
    assert keys == {f"default/{d}".encode() for d in docs}


def test_status_shows_lag_dead_letters_rows_and_indexes(migrated: Any, encoder: Any) -> None:
    """vecpipe status reports each stage's lag, dead-letter depth, rows per tenant, indexes."""
    cfg = migrated
    with Publisher(cfg) as pub:
        for i in range(5):
            pub.publish(Document("acme", f"d{i}", f"status text {i}", version=1))
    before = json.loads(run_cli(cfg, "status", "--json").stdout)
    assert [s["lag"] for s in before["stages"]] == [5, 0]
    assert run_stage("embed", cfg, encoder=encoder) == 0
    assert run_stage("write", cfg) == 0
    proc = run_cli(cfg, "status", "--json")
    after = json.loads(proc.stdout)
    assert [s["lag"] for s in after["stages"]] == [0, 0]
    assert after["rows_per_tenant"] == {"acme": 5}
    assert after["dead_letters"] == {f"{cfg.kafka.chunks_topic}.dlq": 0,
                                     f"{cfg.kafka.embeddings_topic}.dlq": 0}
    assert any(ix["name"].startswith("chunks_embedding_hnsw") and ix["valid"]
               for ix in after["indexes"])
