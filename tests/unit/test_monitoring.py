"""The series behind the dashboard and the alerts, on fakes; and the dashboard file itself."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from vecpipe.config import load_config
from vecpipe.health import OUTCOMES, Health, Metrics
from workers.gauges import (
    GaugeRefresher,
    dead_letter_depth,
    index_validity,
    preset,
    refresher_for,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "vecpipe" / "files" / "vecpipe-dashboard.json"


class Log:
    """Records warnings as (event, fields)."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The sample ``name`` with ``labels``, or None when the series does not exist."""
    got = metrics.registry.get_sample_value(name, labels)
    return None if got is None else float(got)


def test_every_known_label_set_exists_at_zero_from_the_start() -> None:
    """A fresh worker exports its outcomes, retry kinds, row actions and dead letters at 0."""
    write = Metrics("write")
    preset(write)
    for outcome in OUTCOMES:
        assert value(write, "vecpipe_messages_total", stage="write", outcome=outcome) == 0
    for kind in ("produce", "database"):
        assert value(write, "vecpipe_retries_total", stage="write", kind=kind) == 0
    for action in ("inserted", "updated", "unchanged", "stale_deleted", "deleted"):
        assert value(write, "vecpipe_rows_total", stage="write", action=action) == 0
    assert value(write, "vecpipe_dead_letters_total", stage="write") == 0
    assert value(write, "vecpipe_unchanged_total", stage="write") == 0
    assert value(write, "vecpipe_batch_seconds_count", stage="write") == 0
    assert value(write, "vecpipe_encode_seconds_count", stage="write") is None

    embed = Metrics("embed")
    preset(embed)
    for kind in ("produce", "model", "oom_split", "error_split"):
        assert value(embed, "vecpipe_retries_total", stage="embed", kind=kind) == 0
    assert value(embed, "vecpipe_encode_seconds_count", stage="embed") == 0
    assert value(embed, "vecpipe_rows_total", stage="embed", action="inserted") is None
    assert (value(embed, "vecpipe_last_progress_timestamp_seconds", stage="embed") or 0) > 0


def test_progress_timestamp_follows_the_liveness_rule() -> None:
    """While idle each loop turn moves the timestamp; while a batch is under way only its steps
    do, so a batch stuck in one call stops the clock although the loop keeps turning."""
    metrics = Metrics("embed")
    health = Health(stall_after_s=60, metrics=metrics)
    gauge = metrics.last_progress.labels("embed")

    def progress_after(step: Any) -> float:
        gauge.set(0)
        step()
        return value(metrics, "vecpipe_last_progress_timestamp_seconds", stage="embed") or 0

    assert progress_after(health.beat) > 0
    assert progress_after(health.batch_progress) > 0
    assert progress_after(health.beat) == 0
    health.batch_done()
    assert progress_after(health.beat) > 0


def test_dead_letter_depth_reads_the_stage_dead_letter_topic() -> None:
    """The depth job asks for the source topic's dead-letter topic and sets it as the label."""
    cfg = load_config(environ={})
    metrics = Metrics("embed")
    asked: list[str] = []

    def depth(kafka: Any, topic: str) -> int:
        asked.append(topic)
        return 7

    dead_letter_depth(metrics, cfg.kafka, cfg.kafka.chunks_topic, depth=depth)()
    dlq = cfg.kafka.dlq_topic(cfg.kafka.chunks_topic)
    assert asked == [dlq]
    assert value(metrics, "vecpipe_dead_letter_depth", stage="embed", topic=dlq) == 7


def test_index_validity_sets_one_or_zero_and_forgets_dropped_indexes() -> None:
    """Valid indexes read 1, invalid ones 0, and a dropped index's series goes away."""
    cfg = load_config(environ={})
    metrics = Metrics("write")
    reads = iter([{"chunks_pkey": True, "chunks_embedding_hnsw": False},
                  {"chunks_pkey": True}])
    job = index_validity(metrics, cfg.database, read=lambda db: next(reads))
    job()
    assert value(metrics, "vecpipe_index_valid", stage="write", index="chunks_pkey") == 1
    assert value(metrics, "vecpipe_index_valid", stage="write",
                 index="chunks_embedding_hnsw") == 0
    job()
    assert value(metrics, "vecpipe_index_valid", stage="write", index="chunks_pkey") == 1
    assert value(metrics, "vecpipe_index_valid", stage="write",
                 index="chunks_embedding_hnsw") is None


def test_a_failed_refresh_is_logged_and_the_other_gauges_still_refresh() -> None:
    """One job raising (broker down) neither stops the refresher nor the jobs after it."""
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("broker unreachable")

    log = Log()
    refresher = GaugeRefresher({"a": broken, "b": lambda: ran.append("b")}, log)
    refresher.refresh()
    refresher.refresh()
    assert ran == ["b", "b"]
    assert [(e, f["gauge"], f["error"]) for e, f in log.warnings] == [
        ("gauge_refresh_failed", "a", "broker unreachable")] * 2


def test_the_refresher_runs_at_start_and_again_until_stopped() -> None:
    """The background thread refreshes at once, then every interval, and stops when told."""
    turns: list[int] = []
    twice = threading.Event()

    def job() -> None:
        turns.append(1)
        if len(turns) >= 2:
            twice.set()

    refresher = GaugeRefresher({"job": job}, Log(), interval_s=0.01)
    refresher.start()
    try:
        assert twice.wait(10)
    finally:
        refresher.stop(timeout=10)
    assert refresher._thread is not None and not refresher._thread.is_alive()


def test_each_stage_refreshes_its_own_gauges() -> None:
    """Both stages watch their dead-letter topic; only the writer reads index validity."""
    cfg = load_config(environ={})
    assert set(refresher_for(cfg, Metrics("embed"), Log()).jobs) == {"vecpipe_dead_letter_depth"}
    assert set(refresher_for(cfg, Metrics("write"), Log()).jobs) == {
        "vecpipe_dead_letter_depth", "vecpipe_index_valid"}


# -- the dashboard ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_a_grafana_dashboard_over_a_datasource_variable(dashboard: Any) -> None:
    """The JSON has a uid, a recent schema, unique panel ids, and the datasource and stage
    variables its queries use."""
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "label_values(vecpipe_messages_total, stage)" in json.dumps(variables["stage"])


def test_every_panel_has_targets_with_the_datasource(dashboard: Any) -> None:
    """Every panel but the rows queries Prometheus through ${datasource}, with an expression."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["expr"].strip() and target["refId"], panel["title"]


def test_dashboard_names_only_exported_series_and_shows_every_one(dashboard: Any) -> None:
    """Each vecpipe_* series a query names is one a worker exports, and each exported family
    has a panel."""
    exported: set[str] = set()
    for stage in ("embed", "write"):
        metrics = Metrics(stage)
        preset(metrics)
        for family in metrics.registry.collect():
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    named = {re.sub(r"_(bucket|sum|count)$", "", n) for _, t in _targets(dashboard)
             for n in re.findall(r"\bvecpipe_\w+", t["expr"])}
    assert named <= exported, named - exported
    assert exported <= named, exported - named
