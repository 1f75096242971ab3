"""``vecpipe status``: the pipeline in one view: lag per stage, dead letters, rows, indexes."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vecpipe.cli.common import add_db_flags, add_kafka_flags, config_from_args
from vecpipe.config import Config
from vecpipe.errors import Unreachable

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
    from vecpipe.kafka.admin import group_lag

    lags = group_lag(cfg.kafka, group, topic)
    return StageLag(stage, topic, group, sum(lags.values()), lags)


def collect(cfg: Config) -> PipelineStatus:
    """Read lag and dead-letter depth from the broker, rows and indexes from the database."""
    from psycopg import sql

    from vecpipe.db.pool import connect, search_database
    from vecpipe.kafka.admin import topic_depth

    k = cfg.kafka
    status = PipelineStatus()
    status.stages.append(_lag(cfg, "embed", k.chunks_topic, k.embed_group))
    status.stages.append(_lag(cfg, "write", k.embeddings_topic, k.write_group))
    for topic in (k.chunks_topic, k.embeddings_topic):
        status.dead_letters[k.dlq_topic(topic)] = topic_depth(k, k.dlq_topic(topic))
    try:
        # Read where searches read (database.search_url, a replica, when set).
        with connect(search_database(cfg.database), vector_types=False) as conn:
            chunks = sql.Identifier(cfg.database.schema, "chunks")
            status.rows_per_tenant = dict(conn.execute(sql.SQL(
                "SELECT tenant_id, count(*) FROM {} GROUP BY 1 ORDER BY 2 DESC LIMIT 50"
            ).format(chunks)).fetchall())
            for name, valid, size, scans in conn.execute(
                "SELECT c.relname, i.indisvalid, pg_relation_size(c.oid), "
                "       coalesce(s.idx_scan, 0) "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_class t ON t.oid = i.indrelid "
                "LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid "
                "WHERE t.oid = to_regclass(%s) ORDER BY 1", (chunks.as_string(conn),)
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
    status = collect(config_from_args(args))
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        _print(status)
    unhealthy = any(status.dead_letters.values()) or any(not i["valid"] for i in status.indexes)
    return 1 if unhealthy else 0


def register(sub: Any) -> None:
    """Add ``vecpipe status``."""
    p = sub.add_parser("status", help="lag per stage, dead letters, rows per tenant, indexes")
    add_kafka_flags(p)
    add_db_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
