"""The benchmarks by name, how one runs on real services, and its report as readable lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from vecpipe.bench import e2e, embed, search, serve, spike, write
from vecpipe.bench.env import (
    Progress,
    bench_services,
    database_info,
    load_average,
    machine_info,
)
from vecpipe.config import Config

__all__ = ["BENCHMARKS", "run_benchmark", "summary_lines"]


def _embed(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return embed.run(cfg, progress, chunks=args.chunks)


def _write(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return write.run(cfg, progress, rows=args.rows, hnsw_rows=args.hnsw_rows)


def _e2e(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return e2e.run_e2e(cfg, progress, chunks=args.chunks, offered_rate=args.rate,
                             latency_docs=args.latency_docs)


def _reingest(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return e2e.run_reingest(cfg, progress, chunks=args.chunks)


def _search(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return search.run(cfg, progress, rows=args.rows, queries=args.queries,
                            ef_search=args.ef_search, clusters=args.clusters)


def _spike(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return spike.run(cfg, progress, rows=args.rows, base=args.base, qps=args.qps,
                     idle_s=args.idle_s, pause_ratio=args.pause_ratio)


def _serve(cfg: Config, progress: Progress, args: argparse.Namespace) -> dict[str, Any]:
    return serve.run(cfg, progress, rows=args.rows, queries=args.queries, seconds=args.seconds,
                     max_clients=args.max_clients, cli_queries=args.cli_queries)


Runner = Callable[[Config, Progress, argparse.Namespace], dict[str, Any]]

# name -> (runner, uses the model)
BENCHMARKS: dict[str, tuple[Runner, bool]] = {
    "embed": (_embed, True),
    "write": (_write, False),
    "e2e": (_e2e, True),
    "search": (_search, True),
    "reingest": (_reingest, True),
    "spike": (_spike, False),
    "serve": (_serve, False),
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
