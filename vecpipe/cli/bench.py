"""``vecpipe bench``: each stage measured against its physical limit, in the same run.

See ``vecpipe.bench`` for what the benchmarks do; this module only parses their arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vecpipe.cli.common import (
    add_db_flags,
    add_kafka_flags,
    add_model_flags,
    config_from_args,
    positive_float,
    positive_int,
)

__all__ = ["register"]

_DESCRIPTION = (
    "Every benchmark runs on real services: the configured ones (VECPIPE_KAFKA_BOOTSTRAP, "
    "VECPIPE_DATABASE_URL) when they answer, else local ones started in a temporary home and "
    "removed after. The pipeline and its limit are measured on the same machine in the same "
    "run, and the figures that matter are their ratio.")


def _ef_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ef-search takes whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--ef-search values must be at least 1, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark named on the command line and print its report."""
    from vecpipe.bench.registry import run_benchmark, summary_lines

    embed = {"batch_size": getattr(args, "batch_size", None)}
    cfg = config_from_args(args, embed=embed)
    report = run_benchmark(args.benchmark, cfg, args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(summary_lines(report)))
    sys.stdout.flush()
    return 0


def register(sub: Any) -> None:
    """Add ``vecpipe bench``."""
    p = sub.add_parser(
        "bench", help="measure each stage against its physical limit, in the same run",
        description=_DESCRIPTION)
    kinds = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def common(q: argparse.ArgumentParser, model: bool) -> None:
        add_kafka_flags(q)
        add_db_flags(q)
        if model:
            add_model_flags(q)
            q.add_argument("--torch-threads", type=positive_int,
                           help="torch intra-op threads for the run (default: torch's own)")
        q.add_argument("--json", action="store_true", help="print the report as one JSON object")
        q.set_defaults(func=cmd_bench)

    q = kinds.add_parser("embed", help="embed worker (Kafka in to Kafka out) vs raw encode")
    common(q, model=True)
    q.add_argument("--chunks", type=positive_int, default=1000,
                   help="demo-corpus chunks to embed (default 1000)")
    q.add_argument("--batch-size", type=positive_int, help="embed.batch_size for both sides")

    q = kinds.add_parser("write", help="writer (Kafka in to committed rows) vs raw COPY/INSERT")
    common(q, model=False)
    q.add_argument("--rows", type=positive_int, default=20_000,
                   help="rows for the unindexed comparison (default 20000)")
    q.add_argument("--hnsw-rows", type=positive_int,
                   help="rows for the HNSW comparison (default 2000, at most --rows)")

    q = kinds.add_parser("e2e", help="publish to searchable: throughput vs raw encode, latency")
    common(q, model=True)
    q.add_argument("--chunks", type=positive_int, default=500,
                   help="demo-corpus chunks for the throughput run (default 500)")
    q.add_argument("--rate", type=positive_float, default=1.0,
                   help="documents per second offered in the latency run (default 1.0)")
    q.add_argument("--latency-docs", type=positive_int, default=30,
                   help="documents published in the latency run (default 30)")
    q.add_argument("--batch-size", type=positive_int, help="embed.batch_size for both sides")

    q = kinds.add_parser("search", help="HNSW lookup and whole-request latency, recall@10")
    common(q, model=True)
    q.add_argument("--rows", type=positive_int, default=100_000,
                   help="synthetic rows (default 100000; the targets are set for 1000000)")
    q.add_argument("--queries", type=positive_int, default=200,
                   help="queries per ef_search value (default 200)")
    q.add_argument("--ef-search", type=_ef_list, default=[20, 40, 80, 160],
                   help="comma-separated hnsw.ef_search values (default 20,40,80,160)")
    q.add_argument("--clusters", type=positive_int,
                   help="clusters of the synthetic vectors (default: the square root of --rows)")

    q = kinds.add_parser(
        "spike", help="fixed-rate searches during a bulk HNSW ingest: defaults vs tuned")
    common(q, model=False)
    q.add_argument("--rows", type=positive_int, default=100_000,
                   help="rows ingested through the writer into the live index (default 100000)")
    q.add_argument("--base", type=positive_int, default=20_000,
                   help="rows COPYed and indexed before the ingest (default 20000)")
    q.add_argument("--qps", type=positive_float, default=10.0,
                   help="searches per second, fixed, in both phases (default 10)")
    q.add_argument("--idle-s", type=positive_float, default=30.0,
                   help="seconds of searches with nothing else running (default 30)")
    q.add_argument("--pause-ratio", type=positive_float, default=0.1,
                   help="write.pause_ratio of the tuned profile's writer (default 0.1)")

    q = kinds.add_parser(
        "serve", help="vecpipe serve over HTTP: 1 client and rising concurrency, vs the CLI")
    common(q, model=True)
    q.add_argument("--rows", type=positive_int, default=100_000,
                   help="synthetic rows (default 100000)")
    q.add_argument("--queries", type=positive_int, default=300,
                   help="text queries of the one-client run (default 300)")
    q.add_argument("--seconds", type=positive_float, default=15.0,
                   help="seconds at each concurrency level (default 15)")
    q.add_argument("--max-clients", type=positive_int, default=32,
                   help="the highest concurrency, doubling from 2 (default 32)")
    q.add_argument("--cli-queries", type=positive_int, default=5,
                   help="queries through vecpipe search, a process each (default 5)")

    q = kinds.add_parser("reingest", help="re-publishing an unchanged corpus vs the first ingest")
    common(q, model=True)
    q.add_argument("--chunks", type=positive_int, default=500,
                   help="demo-corpus chunks (default 500)")
