"""The server settings vecpipe recommends for ingestion spikes, and which ones are far off.

A bulk ingest into an HNSW-indexed table writes WAL fast: with the defaults (checkpoint every
5 minutes or 1 GB of WAL, no WAL compression) checkpoints come often, and after each one every
page touched is written again whole (full_page_writes), so the ingest's WAL doubles and the
I/O that searches need stalls behind it. The recommendation spaces checkpoints, compresses the
page images, gives maintenance (autovacuum, index builds) memory enough for the HNSW graph, and
keeps parallel scans from taking every core from concurrent searches. ``vecpipe index stats``
flags the settings that are far from it (pure: :func:`setting_flags`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

__all__ = ["RECOMMENDED", "Recommendation", "read_settings", "setting_flags"]


@dataclass(frozen=True)
class Recommendation:
    """One server setting: the value vecpipe recommends, the bound it flags, and why."""

    name: str
    # A value ALTER SYSTEM takes (the spike benchmark's tuned profile applies it).
    recommended: str
    # A value below ``at_least`` (or above ``at_most``) is "far from the recommendation", in
    # the setting's base unit as pg_settings reports it (seconds, kB, 8 kB pages, or a count).
    at_least: float | None
    at_most: float | None
    why: str


RECOMMENDED: tuple[Recommendation, ...] = (
    Recommendation("checkpoint_timeout", "15min", 600, None,
                   "frequent checkpoints make a bulk ingest write every touched page again "
                   "whole, doubling its WAL"),
    Recommendation("max_wal_size", "4GB", 2 * 1024, None,  # pg_settings reports MB
                   "WAL volume, not the clock, then forces checkpoints during an ingest"),
    Recommendation("wal_compression", "lz4", None, None,
                   "full-page images of HNSW pages compress well (pglz where the server lacks "
                   "lz4); off writes them raw"),
    Recommendation("maintenance_work_mem", "1GB", 256 * 1024, None,  # kB
                   "autovacuum and index builds of an HNSW graph that does not fit run many "
                   "times slower"),
    Recommendation("effective_io_concurrency", "200", 64, None,
                   "on SSDs, prefetching keeps bitmap and vacuum reads from waiting one by one"),
    Recommendation("max_parallel_workers_per_gather", "2", None, 2,
                   "a parallel exact scan takes cores from concurrent searches and the writer"),
)

# The chunks table's own autovacuum settings (migration 0008): a table that grows by millions
# of rows must be vacuumed (visibility map, HNSW cleanup) and analyzed (the search strategy
# reads its estimates) long before the default 20% of it has changed.
CHUNKS_AUTOVACUUM = {"autovacuum_vacuum_scale_factor": 0.05,
                     "autovacuum_vacuum_insert_scale_factor": 0.05,
                     "autovacuum_analyze_scale_factor": 0.02}


def read_settings(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The recommended settings' current values, in pg_settings' base units."""
    rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                        ([r.name for r in RECOMMENDED],)).fetchall()
    return {str(name): str(value) for name, value in rows}


def setting_flags(current: Mapping[str, str], reloptions: Mapping[str, str]) -> list[str]:
    """A sentence for each setting far from the recommendation (``current`` from
    :func:`read_settings`, ``reloptions`` the chunks table's)."""
    flags = []
    for rec in RECOMMENDED:
        value = current.get(rec.name)
        if value is None:
            continue
        if rec.name == "wal_compression":
            far = value == "off"
        else:
            try:
                number = float(value)
            except ValueError:
                continue
            far = ((rec.at_least is not None and number < rec.at_least)
                   or (rec.at_most is not None and number > rec.at_most))
        if far:
            flags.append(f"server setting {rec.name} is {value} (recommended {rec.recommended}): "
                         f"{rec.why}")
    for name, wanted in CHUNKS_AUTOVACUUM.items():
        try:
            have = float(reloptions.get(name, "0.2"))
        except ValueError:
            continue
        if have > 2 * wanted:
            flags.append(f"the chunks table's {name} is {have:g} (recommended {wanted:g}, "
                         "migration 0008): autovacuum waits for too large a share of a big "
                         "table to change")
    return flags
