"""The dashboard and the alert rules against a real Prometheus scraping real workers.

One Prometheus per module (Debian's ``prometheus`` package; scripts/install-prometheus.sh)
scrapes an embed and a write worker on fixed ports every second while they ingest a few
documents, and loads the rules file that the chart and docker-compose load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from producers.publisher import Publisher
from tests.helpers import background_stage, connect
from vecpipe.config import with_section
from vecpipe.db.indexes import index_name
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import CHUNK, Document, schema_headers
from workers import gauges

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "helm" / "vecpipe" / "files"
DASHBOARD = FILES / "vecpipe-dashboard.json"
ALERTS = FILES / "vecpipe-alerts.yml"
# Grafana's $__rate_interval for a 1 s scrape, widened to cover the whole test: the ingest's
# batches come first, and a histogram's quantile over a window with no batch in it is NaN
# (on a slow machine the checks can take more than a minute after the last batch).
RATE_INTERVAL = "10m"
DOCS = {
    "argparse": "Command-line parsing library: options, arguments and sub-commands.",
    "json": "JSON encoder and decoder: Python objects to JSON text and back.",
    "sqlite3": "A SQL interface to SQLite databases: connect, execute queries, fetch rows.",
}
BROKEN_INDEX = "monitoring_broken"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Prometheus:
    """A running Prometheus and the ports of the workers it scrapes."""

    url: str
    ports: dict[str, int]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; fail on an error status."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def log_tail(self) -> str:
        """The end of Prometheus's own log, for failure messages."""
        return self.log.read_text(errors="replace")[-3000:]


def _binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    message = "no prometheus binary on PATH; install it with scripts/install-prometheus.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus (1 s scrapes and rule evaluations) over two worker ports."""
    binary = _binary()
    home = tmp_path_factory.mktemp("prometheus")
    ports = {"embed": _free_port(), "write": _free_port()}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": f"vecpipe-{stage}",
             "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for stage, port in ports.items()],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = home / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={home / 'prometheus.yml'}",
             f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", ports, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{prom.log_tail()}"
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{prom.log_tail()}"
            time.sleep(0.3)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, with Grafana's variables set."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$stage", ".*"))
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            out.append((panel["title"], expr))
    return out


def _finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in result if math.isfinite(float(s["value"][1]))]


def _ingest(cfg: Any) -> None:
    with Publisher(cfg) as pub:
        for doc_id, text in DOCS.items():
            pub.publish(Document(cfg.produce.tenant, doc_id, text, version=1))
    producer = DurableProducer(cfg.kafka)
    producer.produce(cfg.kafka.chunks_topic, b"{broken", key=b"default/broken",
                     headers=schema_headers(CHUNK))
    producer.flush()
    producer.close()


def _wait_rows(cfg: Any, want: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    with connect(cfg.database) as conn:
        while True:
            (n,) = conn.execute("SELECT count(DISTINCT doc_id) FROM chunks").fetchone() or (0,)
            conn.commit()
            if n >= want:
                return
            assert time.monotonic() < deadline, f"{n} of {want} documents written"
            time.sleep(0.5)


def _break_an_index(cfg: Any) -> None:
    """Leave an invalid index behind, as a failed concurrent build does."""
    with (connect(cfg.database, vector_types=False, autocommit=True) as conn,
          pytest.raises(psycopg.errors.UniqueViolation)):
        conn.execute(sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (tenant_id)").format(
            sql.Identifier(BROKEN_INDEX), sql.Identifier(cfg.database.schema, "chunks")))


def test_every_dashboard_query_returns_series_from_real_workers(
    migrated: Any, encoder: Any, prometheus: Prometheus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every target of every panel returns finite series while real workers ingest, and the new
    gauges say what the broker and the catalog say: one dead letter waiting, an invalid index."""
    monkeypatch.setattr(gauges, "REFRESH_S", 1.0)
    cfg = migrated
    _ingest(cfg)
    embed_cfg = with_section(cfg, "ops", metrics_port=prometheus.ports["embed"])
    write_cfg = with_section(cfg, "ops", metrics_port=prometheus.ports["write"])
    with background_stage("embed", embed_cfg, encoder=encoder), \
            background_stage("write", write_cfg):
        _wait_rows(cfg, len(DOCS))
        _break_an_index(cfg)
        dlq = cfg.kafka.dlq_topic(cfg.kafka.chunks_topic)
        checks = [*dashboard_queries(),
                  ("dead-letter depth of the embed stage",
                   f'vecpipe_dead_letter_depth{{stage="embed", topic="{dlq}"}} == 1'),
                  ("the broken index", f'vecpipe_index_valid{{index="{BROKEN_INDEX}"}} == 0'),
                  ("the vector index",
                   f'vecpipe_index_valid{{stage="write", index="{index_name(cfg)}"}} == 1')]
        missing: dict[str, str] = {}
        deadline = time.monotonic() + 90
        nudges = 0
        while True:
            missing = {}
            for title, expr in checks:
                if not _finite(prometheus.api("query", query=expr)["result"]):
                    missing[expr] = title
            if not missing or time.monotonic() > deadline:
                break
            # A rate needs an increase between two scrapes: when the whole ingest was over
            # before Prometheus first scraped, the latency quantiles have none. More documents
            # make more batches, now that it scrapes.
            if any("histogram_quantile" in expr for expr in missing):
                nudges += 1
                with Publisher(cfg) as pub:
                    pub.publish(Document(cfg.produce.tenant, f"nudge-{nudges}",
                                         f"Another short document, number {nudges}.", version=1))
            time.sleep(1)
        targets = prometheus.api("targets")["activeTargets"]
        stages = prometheus.api("label/stage/values", **{"match[]": "vecpipe_messages_total"})
    assert not missing, (
        "queries without a finite series:\n"
        + "\n".join(f"  {title}: {expr}" for expr, title in missing.items())
        + "\ntargets: " + json.dumps([(t["scrapeUrl"], t["health"], t["lastError"])
                                      for t in targets]))
    assert {"embed", "write"} <= set(stages)


def test_every_alert_rule_loads_and_evaluates_without_error(prometheus: Prometheus) -> None:
    """Prometheus loads every rule of the rules file and evaluates each one with health ok."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    wanted = {rule.get("alert") or rule["record"] for group in groups for rule in group["rules"]}
    deadline = time.monotonic() + 30
    while True:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        evaluated = {r["name"]: r for r in rules if not r["lastEvaluation"].startswith("0001")}
        if wanted <= evaluated.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in rules} == wanted, prometheus.log_tail()
    assert wanted <= evaluated.keys(), f"never evaluated: {wanted - evaluated.keys()}"
    bad = {name: r.get("lastError") for name, r in evaluated.items() if r["health"] != "ok"}
    assert not bad, bad
