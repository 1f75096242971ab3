"""Unit tests of producers.publisher with a fake producer: what it sends, and what it refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producers.publisher import Publisher
from tests.fakes import FakeProducer
from vecpipe.config import Config
from vecpipe.errors import InvalidMessage
from vecpipe.messages import PUBLISHED_HEADER, Chunk, Document, content_hash, header_value


def publisher(chunker: Any) -> tuple[Publisher, FakeProducer]:
    pub = Publisher(Config(), chunker, create_topics=False, **{"log_level": 0})
    fake = FakeProducer()
    pub.producer = fake  # type: ignore[assignment]
    return pub, fake


def chunk(text: str = "some text", **changes: Any) -> Chunk:
    values: dict[str, Any] = {"tenant_id": "acme", "doc_id": "d", "version": 2,
                              "chunk_index": 0, "chunk_count": 1, "text": text,
                              "content_hash": content_hash(text), "char_start": 0,
                              "char_end": len(text)}
    values.update(changes)
    return Chunk(**values)


def test_every_chunk_of_a_version_carries_one_publish_time() -> None:
    """The chunks of one publish() share their vecpipe.published_at: the version's time."""
    pub, fake = publisher(lambda doc: [chunk("a", chunk_count=2),
                                       chunk("b", chunk_index=1, chunk_count=2)])
    pub.publish(Document("acme", "d", "a b", 2))
    stamps = {header_value(s.headers, PUBLISHED_HEADER) for s in fake.sent}
    assert len(stamps) == 1 and None not in stamps


def test_a_version_without_content_replaces_the_previous_one() -> None:
    """A document whose new version chunks to nothing is published as a delete of that version:
    the old version stops being searchable (publishing nothing would leave it there for ever)."""
    pub, fake = publisher(lambda doc: [])
    result = pub.publish(Document("acme", "d", "", 5))
    [sent] = fake.sent
    body = json.loads(sent.value or b"")
    assert (body["doc_id"], body["version"]) == ("d", 5) and "no content" in body["reason"]
    assert header_value(sent.headers, "vecpipe.schema") == "vecpipe.delete"
    assert result.chunks == 0


@pytest.mark.parametrize(("bad", "says"), [
    (chunk(content_hash="0" * 64), "content_hash"),
    (chunk(chunk_index=3), "chunk_index"),
    (chunk("nul\x00inside"), "NUL"),
    (chunk(metadata={"k": "v" * 70_000}), "metadata"),
    (chunk(tenant_id="a/b"), "tenant_id"),
])
def test_a_chunk_the_pipeline_would_refuse_is_refused_before_it_is_sent(bad: Chunk,
                                                                        says: str) -> None:
    """publish_chunk and publish check every chunk as the embed stage would, and send none of
    a document that has a bad one."""
    pub, fake = publisher(lambda doc: [chunk(), bad])
    with pytest.raises(InvalidMessage, match=says):
        pub.publish_chunk(bad)
    with pytest.raises(InvalidMessage, match=says):
        pub.publish(Document("acme", "d", "x", 2))
    assert fake.sent == []


@pytest.mark.parametrize(("call", "says"), [
    (lambda pub: pub.delete("a/b", "doc"), "tenant_id"),
    (lambda pub: pub.delete("acme", "doc", reason="r" * 3000), "reason"),
    (lambda pub: pub.delete_tenant(""), "tenant_id"),
])
def test_a_delete_the_pipeline_would_refuse_is_refused_before_it_is_sent(call: Any,
                                                                         says: str) -> None:
    """A caller is never told an erasure was requested when it would be dead-lettered."""
    pub, fake = publisher(lambda doc: [])
    with pytest.raises(InvalidMessage, match=says):
        call(pub)
    assert fake.sent == []
