"""The walking skeleton end to end: documents -> Kafka -> model -> pgvector -> search."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from producers.publisher import Publisher
from tests.helpers import connect, run_cli
from vecpipe.messages import Document

pytestmark = pytest.mark.integration

DOCS = {
    "argparse": "Command-line parsing library. This module helps programs parse command line "
                "arguments, options and sub-commands, and generates help and usage messages.",
    "json": "JSON encoder and decoder. Serialize Python objects to JSON text and parse JSON "
            "documents back into dictionaries and lists.",
    "sqlite3": "The sqlite3 module provides a SQL interface to SQLite databases: connect to a "
               "database file, execute queries and fetch rows.",
}


@pytest.mark.pgbouncer
def test_documents_become_searchable_through_real_broker_model_and_database(
    migrated: Any,
) -> None:
    """Published documents are embedded and written by the CLI workers and found by search."""
    cfg = migrated
    with Publisher(cfg) as pub:
        for doc_id, text in DOCS.items():
            pub.publish(Document(cfg.produce.tenant, doc_id, text, version=1))

    run_cli(cfg, "embed", "--until-idle", "3")
    run_cli(cfg, "write", "--until-idle", "3")

    with connect(cfg.database) as conn:
        rows = conn.execute(
            "SELECT doc_id, embedding, vector_dims(embedding), model_name, embedded_at "
            "FROM chunks").fetchall()
    assert sorted(r[0] for r in rows) == sorted(DOCS)
    for _, emb, dims, model, embedded_at in rows:
        assert dims == 384
        assert abs(float(np.linalg.norm(emb.to_numpy())) - 1.0) < 1e-4
        assert "all-minilm-l6-v2" in model.lower().replace("_", "-")
        assert embedded_at is not None

    out = run_cli(cfg, "search", "how do I parse command line arguments", "-k", "3").stdout
    lines = [ln for ln in out.splitlines() if ln.strip()[:2].rstrip(".").isdigit()]
    assert "argparse" in lines[0], out


def test_bad_broker_address_stops_with_one_sentence_naming_the_setting(cfg: Any) -> None:
    """An unreachable broker is a one-line error naming VECPIPE_KAFKA_BOOTSTRAP, not a traceback."""
    proc = run_cli(cfg, "write", "--until-idle", "1", check=False,
                   extra_env={"VECPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert proc.returncode == 2
    assert "VECPIPE_KAFKA_BOOTSTRAP" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_database_url_stops_with_one_sentence_naming_the_setting(cfg: Any) -> None:
    """A wrong database URL is a one-line error naming VECPIPE_DATABASE_URL."""
    proc = run_cli(cfg, "migrate", check=False,
                   extra_env={"VECPIPE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert proc.returncode == 2
    assert "VECPIPE_DATABASE_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_stops_with_one_sentence_naming_the_setting(migrated: Any) -> None:
    """A model that is not on disk is a one-line error naming VECPIPE_MODEL; nothing downloads."""
    proc = run_cli(migrated, "embed", "--until-idle", "1", check=False,
                   extra_env={"VECPIPE_MODEL": "/nonexistent/model-folder"})
    assert proc.returncode == 2, proc.stderr
    assert "VECPIPE_MODEL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_delete_commands_remove_a_document_and_a_tenant_end_to_end(
    migrated: Any, encoder: Any
) -> None:
    """vecpipe delete removes a document, then a whole tenant, through both stages, audited."""
    from tests.helpers import run_stage

    cfg = migrated
    with Publisher(cfg) as pub:
        for tenant in ("acme", "other"):
            for doc_id, text in DOCS.items():
                pub.publish(Document(tenant, doc_id, text, version=1))
    assert run_stage("embed", cfg, encoder=encoder) == 0
    assert run_stage("write", cfg) == 0
    run_cli(cfg, "delete", "acme", "json", "--reason", "ticket-1")
    run_cli(cfg, "delete", "other", "--reason", "contract ended")
    assert run_stage("embed", cfg, encoder=encoder) == 0
    assert run_stage("write", cfg) == 0
    with connect(cfg.database) as conn:
        left = conn.execute("SELECT tenant_id, doc_id FROM chunks ORDER BY 1, 2").fetchall()
    assert left == [("acme", "argparse"), ("acme", "sqlite3")]
    audit = run_cli(cfg, "audit", "--json").stdout
    assert "ticket-1" in audit and "contract ended" in audit
