"""The server settings that `vecpipe index stats` flags as far from the recommendation."""

from __future__ import annotations

from vecpipe.db.tuning import CHUNKS_AUTOVACUUM, RECOMMENDED, setting_flags

# PostgreSQL 18's defaults, in pg_settings' base units.
DEFAULTS = {"checkpoint_timeout": "300", "max_wal_size": "1024", "wal_compression": "off",
            "maintenance_work_mem": "65536", "effective_io_concurrency": "16",
            "max_parallel_workers_per_gather": "2"}
TUNED = {"checkpoint_timeout": "900", "max_wal_size": "4096", "wal_compression": "lz4",
         "maintenance_work_mem": "1048576", "effective_io_concurrency": "200",
         "max_parallel_workers_per_gather": "2"}
MIGRATED = {k: str(v) for k, v in CHUNKS_AUTOVACUUM.items()}


def test_the_defaults_are_flagged_with_the_recommendation_and_why() -> None:
    flags = setting_flags(DEFAULTS, {})
    named = {f.split()[2] for f in flags if f.startswith("server setting")}
    assert named == {"checkpoint_timeout", "max_wal_size", "wal_compression",
                     "maintenance_work_mem", "effective_io_concurrency"}
    assert any("checkpoint_timeout is 300 (recommended 15min)" in f for f in flags)
    # An unmigrated table keeps the 20% default: all three autovacuum settings are flagged.
    assert sum("the chunks table's" in f for f in flags) == len(CHUNKS_AUTOVACUUM)


def test_the_recommended_settings_and_a_migrated_table_raise_no_flag() -> None:
    assert setting_flags(TUNED, MIGRATED) == []


def test_too_many_parallel_workers_are_flagged() -> None:
    flags = setting_flags({**TUNED, "max_parallel_workers_per_gather": "8"}, MIGRATED)
    assert len(flags) == 1 and "max_parallel_workers_per_gather is 8" in flags[0]


def test_every_recommendation_says_why() -> None:
    assert all(r.why and r.recommended for r in RECOMMENDED)
