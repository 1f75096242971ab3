"""``vecpipe bench``: each stage measured against its physical limit, in the same run.

    vecpipe bench embed    [--chunks 1000] [--backend onnx-int8] [--device cuda]
    vecpipe bench write    [--rows 20000] [--hnsw-rows 2000]
    vecpipe bench e2e      [--chunks 500] [--rate 1.0] [--latency-docs 30]
    vecpipe bench search   [--rows 100000] [--queries 200] [--ef-search 20,40,80,160]
    vecpipe bench reingest [--chunks 500]

Every benchmark runs on real services: the configured ones (VECPIPE_KAFKA_BOOTSTRAP,
VECPIPE_DATABASE_URL) when they answer, else local ones started in a temporary home and removed
after. It works in topics, consumer groups and a schema of its own (``bench_<hex>``), deleted
at the end, so it never touches real data. The pipeline and its limit are measured on the same
machine in the same run, and the figures that matter are their ratio. Progress goes to stderr;
the result is one JSON object on stdout (``--json``) or a short summary. Benchmarks are not
tests: nothing here fails on a slow figure, ``meets_target`` only says how it compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from vecpipe.bench_env import (
    BenchError,
    Progress,
    bench_services,
    database_info,
    load_average,
    machine_info,
)
from vecpipe.config import Config

__all__ = ["BENCHMARKS", "register", "run_benchmark", "summary_lines"]


def _embed(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    from vecpipe import bench_embed

    return bench_embed.run(cfg, progress, chunks=args.chunks)


def _write(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    from vecpipe import bench_write

    return bench_write.run(cfg, progress, rows=args.rows, hnsw_rows=args.hnsw_rows)


def _e2e(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    from vecpipe import bench_e2e

    return bench_e2e.run_e2e(cfg, progress, chunks=args.chunks, offered_rate=args.rate,
                             latency_docs=args.latency_docs)


def _reingest(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    from vecpipe import bench_e2e

    return bench_e2e.run_reingest(cfg, progress, chunks=args.chunks)


def _search(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    from vecpipe import bench_search

    return bench_search.run(cfg, progress, rows=args.rows, queries=args.queries,
                            ef_search=args.ef_search, clusters=args.clusters)


Runner = Callable[[Config, Progress, argparse.Namespace], dict[str, Any]]

# name -> (runner, uses the model)
BENCHMARKS: dict[str, tuple[Runner, bool]] = {
    "embed": (_embed, True),
    "write": (_write, False),
    "e2e": (_e2e, True),
    "search": (_search, True),
    "reingest": (_reingest, True),
}


def run_benchmark(name: str, cfg: Config, args: argparse.Namespace,
                  quiet: bool = False) -> dict[str, Any]:
    """Run one benchmark on real services and return its report (the JSON object)."""
    runner, uses_model = BENCHMARKS[name]
    progress = Progress(name, quiet=quiet)
    threads = getattr(args, "torch_threads", None)
    if uses_model and threads:
        import torch

        # Both sides of every comparison run in this process, so both get the same setting.
        torch.set_num_threads(threads)
    report: dict[str, Any] = {"benchmark": name,
                              "machine": machine_info(torch_threads=uses_model)}
    with bench_services(cfg, progress) as (live, used):
        report["services"] = {**used.report(), **database_info(live)}
        report.update(runner(live, progress, args))
    report["machine"]["load_avg_end"] = load_average()
    report["elapsed_s"] = round(progress.elapsed, 1)
    return report


def _flatten(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif not isinstance(value, list) or len(value) <= 4:
        out.append(f"{prefix} = {value}")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as readable lines: each section's figures, targets marked."""
    lines = [f"vecpipe bench {report['benchmark']}  "
             f"({report['machine']['cpu_count']} CPUs, {report['machine']['cpu_model']}, "
             f"load {report['machine']['load_avg_start']} -> "
             f"{report['machine'].get('load_avg_end')})"]
    for key, section in report.items():
        if key in ("benchmark", "machine", "services", "elapsed_s") or not isinstance(section,
                                                                                       dict):
            continue
        targets = section.get("target", {}) if isinstance(section.get("target"), dict) else {}
        met = section.get("meets_target", {})
        lines.append(f"[{key}]")
        for name, value in section.items():
            if name in ("target", "meets_target"):
                continue
            if isinstance(value, dict | list):
                flat: list[str] = []
                _flatten(name, value, flat)
                lines.extend(f"  {f}" for f in flat)
                continue
            mark = ""
            if name in targets:
                mark = f"   target {targets[name]}: {'met' if met.get(name) else 'MISSED'}"
            lines.append(f"  {name} = {value}{mark}")
    lines.append(f"elapsed {report['elapsed_s']} s")
    return lines


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


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
    from vecpipe.cli import CommandError, config_from_args

    embed = {"batch_size": getattr(args, "batch_size", None)}
    cfg = config_from_args(args, embed=embed)
    try:
        report = run_benchmark(args.benchmark, cfg, args)
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(summary_lines(report)))
    sys.stdout.flush()
    return 0


def register(sub: Any) -> None:
    """Add ``vecpipe bench``."""
    from vecpipe.cli import add_db_flags, add_kafka_flags, add_model_flags

    p = sub.add_parser(
        "bench", help="measure each stage against its physical limit, in the same run",
        description=__doc__.split("\n\n")[2] if __doc__ else None)
    kinds = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def common(q: argparse.ArgumentParser, model: bool) -> None:
        add_kafka_flags(q)
        add_db_flags(q)
        if model:
            add_model_flags(q)
            q.add_argument("--torch-threads", type=_positive_int,
                           help="torch intra-op threads for the run (default: torch's own)")
        q.add_argument("--json", action="store_true", help="print the report as one JSON object")
        q.set_defaults(func=cmd_bench)

    q = kinds.add_parser("embed", help="embed worker (Kafka in to Kafka out) vs raw encode")
    common(q, model=True)
    q.add_argument("--chunks", type=_positive_int, default=1000,
                   help="demo-corpus chunks to embed (default 1000)")
    q.add_argument("--batch-size", type=_positive_int, help="embed.batch_size for both sides")

    q = kinds.add_parser("write", help="writer (Kafka in to committed rows) vs raw COPY/INSERT")
    common(q, model=False)
    q.add_argument("--rows", type=_positive_int, default=20_000,
                   help="rows for the unindexed comparison (default 20000)")
    q.add_argument("--hnsw-rows", type=_positive_int,
                   help="rows for the HNSW comparison (default 2000, at most --rows)")

    q = kinds.add_parser("e2e", help="publish to searchable: throughput vs raw encode, latency")
    common(q, model=True)
    q.add_argument("--chunks", type=_positive_int, default=500,
                   help="demo-corpus chunks for the throughput run (default 500)")
    q.add_argument("--rate", type=_positive_float, default=1.0,
                   help="documents per second offered in the latency run (default 1.0)")
    q.add_argument("--latency-docs", type=_positive_int, default=30,
                   help="documents published in the latency run (default 30)")
    q.add_argument("--batch-size", type=_positive_int, help="embed.batch_size for both sides")

    q = kinds.add_parser("search", help="HNSW lookup and whole-request latency, recall@10")
    common(q, model=True)
    q.add_argument("--rows", type=_positive_int, default=100_000,
                   help="synthetic rows (default 100000; the targets are set for 1000000)")
    q.add_argument("--queries", type=_positive_int, default=200,
                   help="queries per ef_search value (default 200)")
    q.add_argument("--ef-search", type=_ef_list, default=[20, 40, 80, 160],
                   help="comma-separated hnsw.ef_search values (default 20,40,80,160)")
    q.add_argument("--clusters", type=_positive_int,
                   help="clusters of the synthetic vectors (default: the square root of --rows)")

    q = kinds.add_parser("reingest", help="re-publishing an unchanged corpus vs the first ingest")
    common(q, model=True)
    q.add_argument("--chunks", type=_positive_int, default=500,
                   help="demo-corpus chunks (default 500)")
