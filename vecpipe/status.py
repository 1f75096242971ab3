"""``vecpipe status``: the pipeline in one view: lag per stage, dead letters, rows, indexes."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from vecpipe.config import Config, Unreachable
from vecpipe.consumer import consumer_config
from vecpipe.db import connect

__all__ = ["PipelineStatus", "collect", "register"]


@dataclass
class StageLag:
    """How far one consumer group is behind on its topic."""

    stage: str
    topic: str
    group: str
    lag: int
    partitions: dict[int, int]


@dataclass
class PipelineStatus:
    """Everything ``vecpipe status`` shows."""

    stages: list[StageLag] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)
    rows_per_tenant: dict[str, int] = field(default_factory=dict)
    indexes: list[dict[str, Any]] = field(default_factory=list)
    database_error: str = ""


def _lag(cfg: Config, stage: str, topic: str, group: str) -> StageLag:
    # A consumer that never subscribes reads the group's commits without joining the group.
    consumer = Consumer(consumer_config(cfg.kafka, group, **{"statistics.interval.ms": 0}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        parts = sorted(meta.partitions) if meta is not None and meta.error is None else []
        committed = {tp.partition: tp.offset for tp in consumer.committed(
            [TopicPartition(topic, p) for p in parts], timeout=10)} if parts else {}
        lags = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            done = committed.get(p, -1)
            lags[p] = high - (done if done >= 0 else low)
    finally:
        consumer.close()
    return StageLag(stage, topic, group, sum(lags.values()), lags)


def _depth(consumer: Consumer, topic: str) -> int:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        return 0
    total = 0
    for p in meta.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        total += high - low
    return total


def collect(cfg: Config) -> PipelineStatus:
    """Read lag and dead-letter depth from the broker, rows and indexes from the database."""
    k = cfg.kafka
    status = PipelineStatus()
    status.stages.append(_lag(cfg, "embed", k.chunks_topic, k.embed_group))
    status.stages.append(_lag(cfg, "write", k.embeddings_topic, k.write_group))
    consumer = Consumer(consumer_config(k, k.embed_group, **{"statistics.interval.ms": 0}))
    try:
        for topic in (k.chunks_topic, k.embeddings_topic):
            status.dead_letters[k.dlq_topic(topic)] = _depth(consumer, k.dlq_topic(topic))
    finally:
        consumer.close()
    try:
        with connect(cfg.database, vector_types=False) as conn:
            status.rows_per_tenant = dict(conn.execute(
                "SELECT tenant_id, count(*) FROM chunks GROUP BY 1 ORDER BY 2 DESC LIMIT 50"
            ).fetchall())
            for name, valid, size, scans in conn.execute(
                "SELECT c.relname, i.indisvalid, pg_relation_size(c.oid), "
                "       coalesce(s.idx_scan, 0) "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_class t ON t.oid = i.indrelid "
                "LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid "
                "WHERE t.oid = 'chunks'::regclass ORDER BY 1"
            ):
                status.indexes.append({"name": name, "valid": valid, "bytes": size,
                                       "scans": scans})
    except Unreachable as exc:
        status.database_error = str(exc)
    except Exception as exc:  # an unmigrated schema still shows the Kafka side
        status.database_error = str(exc).strip().splitlines()[0]
    return status


def _print(status: PipelineStatus) -> None:
    print("stage   topic                          group                  lag")
    for s in status.stages:
        print(f"{s.stage:<7} {s.topic:<30} {s.group:<22} {s.lag}")
    print("\ndead-letter topic                       records")
    for topic, depth in status.dead_letters.items():
        print(f"{topic:<39} {depth}{'  <- inspect with vecpipe dlq inspect' if depth else ''}")
    if status.database_error:
        print(f"\ndatabase: {status.database_error}")
        return
    print("\ntenant                          rows")
    for tenant, rows in status.rows_per_tenant.items():
        print(f"{tenant:<31} {rows}")
    print("\nindex                                   valid  size       scans")
    for ix in status.indexes:
        flag = "yes" if ix["valid"] else "NO (rebuild it)"
        print(f"{ix['name']:<39} {flag:<6} {ix['bytes'] / 2**20:>7.1f} MB {ix['scans']}")


def cmd_status(args: argparse.Namespace) -> int:
    """Print the pipeline's status; exit 1 when dead letters wait or an index is invalid."""
    from vecpipe.cli import config_from_args

    status = collect(config_from_args(args))
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        _print(status)
    unhealthy = any(status.dead_letters.values()) or any(not i["valid"] for i in status.indexes)
    return 1 if unhealthy else 0


def register(sub: Any) -> None:
    """Add ``vecpipe status``."""
    from vecpipe.cli import add_db_flags, add_kafka_flags

    p = sub.add_parser("status", help="lag per stage, dead letters, rows per tenant, indexes")
    add_kafka_flags(p)
    add_db_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
