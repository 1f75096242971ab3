"""Publishing documents against the real broker: the Python API, the CLI, and the contracts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]
from jsonschema import Draft202012Validator

from producers.publisher import Publisher
from tests.helpers import env_for, read_topic
from vecpipe.errors import DeliveryRefused
from vecpipe.kafka.admin import admin_client
from vecpipe.messages import (
    CHUNK,
    DELETE,
    SCHEMA_HEADER,
    VERSION_HEADER,
    Document,
    header_value,
    load_schema,
)

pytestmark = pytest.mark.integration


def test_chunks_and_deletes_of_a_document_share_its_key_partition_and_order(cfg: Any) -> None:
    """A document's chunks and its delete are keyed tenant/doc, on one partition, in order."""
    text = " ".join(f"Sentence {i} of a long document about partitions." for i in range(400))
    with Publisher(cfg) as pub:
        result = pub.publish(Document("acme", "guide", text, version=3, metadata={"lang": "en"}))
        pub.delete("acme", "guide", reason="gdpr request")
        pub.delete_tenant("gone-tenant")
    assert result.chunks > 1
    records = read_topic(cfg, cfg.kafka.chunks_topic)
    guide = [m for m in records if m.key() == b"acme/guide"]
    assert len(guide) == result.chunks + 1
    assert len({m.partition() for m in guide}) == 1
    guide.sort(key=lambda m: m.offset())
    chunk_schema = Draft202012Validator(load_schema("chunk.v1.json"))
    for i, m in enumerate(guide[:-1]):
        assert header_value(m.headers(), SCHEMA_HEADER) == CHUNK
        assert header_value(m.headers(), VERSION_HEADER) == "1"
        value = json.loads(m.value())
        chunk_schema.validate(value)
        assert (value["chunk_index"], value["chunk_count"], value["version"]) == (
            i, result.chunks, 3)
        assert text[value["char_start"]:value["char_end"]].strip() in text
    last = guide[-1]
    assert header_value(last.headers(), SCHEMA_HEADER) == DELETE
    Draft202012Validator(load_schema("delete.v1.json")).validate(json.loads(last.value()))
    tenant = [m for m in records if m.key() == b"gone-tenant/"]
    assert len(tenant) == 1 and "doc_id" not in json.loads(tenant[0].value())


def test_a_refused_delivery_is_raised_never_ignored(cfg: Any) -> None:
    """When the broker refuses a message for good, flush (and leaving the block) raises
    DeliveryRefused, naming the topic and the setting to look at."""
    topic = cfg.kafka.chunks_topic + ".small"
    admin = admin_client(cfg.kafka)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                  config={"max.message.bytes": "512"})])[topic].result(30)
    from dataclasses import replace

    small = replace(cfg, kafka=replace(cfg.kafka, chunks_topic=topic))
    big = " ".join(os.urandom(6).hex() for _ in range(400))  # random: lz4 cannot shrink it
    with pytest.raises(DeliveryRefused, match=f"topic '{topic}'.*max.message.bytes"), \
            Publisher(small, create_topics=False) as pub:
        pub.publish(Document("acme", "big", big, version=1))


def test_produce_cli_reads_formats_reports_unreadable_files_and_dry_runs(
    cfg: Any, tmp_path: Path
) -> None:
    """vecpipe produce takes txt, md, html and JSONL, skips unreadable files with a reason."""
    (tmp_path / "a.txt").write_text("Plain text about Kafka consumers.")
    (tmp_path / "b.md").write_text("# Title\n\nMarkdown about pgvector indexes.")
    (tmp_path / "c.html").write_text("<html><head><title>T</title><script>x()</script></head>"
                                     "<body><p>HTML about HNSW graphs.</p></body></html>")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"doc_id": "j1", "version": 5, "content": "JSONL document one."}) + "\n"
        + "{broken json\n"
        + json.dumps({"doc_id": "j2", "version": 5, "content": "JSONL document two."}) + "\n")
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3\x28")
    env = env_for(cfg)
    dry = subprocess.run([sys.executable, "-m", "vecpipe.cli", "produce", str(tmp_path),
                          "--dry-run", "--quiet"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "chunk characters" in dry.stdout
    proc = subprocess.run([sys.executable, "-m", "vecpipe.cli", "produce", str(tmp_path),
                           "--tenant", "acme", "--quiet"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1  # some inputs were unreadable
    assert "e.txt" in proc.stderr and "d.jsonl:2" in proc.stderr
    assert "5 documents" in proc.stdout
    keys = sorted(m.key().decode() for m in read_topic(cfg, cfg.kafka.chunks_topic))
    assert keys == ["acme/a.txt", "acme/b.md", "acme/c.html", "acme/j1", "acme/j2"]
    html = next(json.loads(m.value()) for m in read_topic(cfg, cfg.kafka.chunks_topic)
                if m.key() == b"acme/c.html")
    assert "HNSW" in html["text"] and "x()" not in html["text"]


def test_produce_cli_reads_jsonl_from_stdin(cfg: Any) -> None:
    """vecpipe produce - publishes the JSONL documents given on standard input."""
    lines = "".join(json.dumps({"tenant_id": "t9", "doc_id": f"s{i}", "version": 1,
                                "content": f"stdin document {i}"}) + "\n" for i in range(3))
    proc = subprocess.run([sys.executable, "-m", "vecpipe.cli", "produce", "-", "--quiet"],
                          env=env_for(cfg), input=lines, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    keys = sorted(m.key() for m in read_topic(cfg, cfg.kafka.chunks_topic))
    assert keys == [b"t9/s0", b"t9/s1", b"t9/s2"]
