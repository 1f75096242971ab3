"""Unit tests of vecpipe.messages: round trips, the embedding wire layout, and invalid messages."""

from __future__ import annotations

import json
import struct
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from vecpipe.errors import InvalidMessage
from vecpipe.messages import (
    CHUNK,
    DELETE,
    DOCUMENT,
    EMBEDDING,
    MAX_CLOCK_SKEW,
    MAX_METADATA_BYTES,
    MAX_VALUE_BYTES,
    SCHEMA_HEADER,
    VERSION_HEADER,
    Chunk,
    Delete,
    Document,
    Embedding,
    content_hash,
    decode,
    document_key,
    encode_chunk,
    encode_delete,
    encode_embedding,
    header_list,
    header_value,
    normalize_text,
    published_at,
    published_header,
    schema_headers,
)


def _chunk(text: str = "The quick brown fox.", **changes: Any) -> Chunk:
    values: dict[str, Any] = {
        "tenant_id": "acme", "doc_id": "doc-1", "version": 7, "chunk_index": 0,
        "chunk_count": 2, "text": text, "content_hash": content_hash(text), "char_start": 0,
        "char_end": len(text), "source_uri": "s3://bucket/doc-1.txt",
        "metadata": {"lang": "en", "tags": ["a", "b"]},
    }
    values.update(changes)
    return Chunk(**values)


def _embedding(vector: list[float], **changes: Any) -> Embedding:
    values: dict[str, Any] = {
        "chunk": _chunk(), "vector": np.asarray(vector, dtype=np.float32),
        "model_name": "all-MiniLM-L6-v2", "model_revision": "abc123",
        "backend": "torch-fp32", "embedded_at": "2024-05-01T12:00:00.000001+00:00",
    }
    values.update(changes)
    return Embedding(**values)


def _meta(value: bytes) -> dict[str, Any]:
    (size,) = struct.unpack(">I", value[:4])
    meta: dict[str, Any] = json.loads(value[4 : 4 + size].decode("utf-8"))
    return meta


# -- round trips ---------------------------------------------------------------------------------


def test_chunk_round_trip() -> None:
    """A chunk decodes to an equal chunk, non-ASCII text included."""
    chunk = _chunk("Grüße aus Köln — 東京")
    assert decode(encode_chunk(chunk), schema_headers(CHUNK)) == chunk
    assert chunk.key == b"acme/doc-1"


def test_chunk_value_is_utf8_json() -> None:
    """A chunk travels as plain UTF-8 JSON with the schema's field names."""
    chunk = _chunk("Grüße")
    data = json.loads(encode_chunk(chunk).decode("utf-8"))
    assert data["text"] == "Grüße"
    assert data == chunk.to_dict()


def test_delete_round_trips() -> None:
    """Document and tenant deletes decode to equal deletes."""
    doc = Delete(tenant_id="acme", doc_id="doc-1", version=3,
                 requested_at="2024-05-01T00:00:00+00:00", reason="gdpr")
    tenant = Delete(tenant_id="acme", requested_at="2024-05-01T00:00:00+00:00")
    assert decode(encode_delete(doc), schema_headers(DELETE)) == doc
    assert decode(encode_delete(tenant), schema_headers(DELETE)) == tenant
    assert doc.key == document_key("acme", "doc-1")
    assert tenant.key == b"acme/"


def test_headers_in_any_form() -> None:
    """Headers are accepted as a list of pairs or a mapping, with str or bytes values."""
    value = encode_chunk(_chunk())
    as_dict: dict[str, str | bytes | None] = {SCHEMA_HEADER: CHUNK, VERSION_HEADER: b"1"}
    assert isinstance(decode(value, as_dict), Chunk)
    assert header_list(as_dict) == schema_headers(CHUNK)
    assert header_value([("a", b"1"), ("a", b"2")], "a") == "2"
    assert header_value(None, "a") is None


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_round_trip(dtype: str) -> None:
    """An embedding decodes to the same chunk, model and (to dtype precision) vector."""
    emb = _embedding([0.6, -0.8, 0.0, 0.125])
    back = decode(encode_embedding(emb, dtype), schema_headers(EMBEDDING))
    assert isinstance(back, Embedding)
    assert back.chunk == emb.chunk
    assert (back.model_name, back.model_revision, back.backend, back.embedded_at) == (
        emb.model_name, emb.model_revision, emb.backend, emb.embedded_at)
    assert back.vector.dtype == np.float32
    tolerance = 0 if dtype == "float32" else 1e-3
    np.testing.assert_allclose(back.vector, emb.vector, atol=tolerance)


# -- the embedding wire layout, read by hand -----------------------------------------------------


def test_embedding_layout_float32() -> None:
    """Value = 4-byte big-endian length, that much JSON, then little-endian float32 values."""
    vector = [0.6, -0.8, 0.0, 1.5]
    value = encode_embedding(_embedding(vector), "float32")
    (size,) = struct.unpack(">I", value[:4])
    meta = json.loads(value[4 : 4 + size].decode("utf-8"))
    body = value[4 + size :]
    assert meta["dtype"] == "float32"
    assert meta["dim"] == 4
    assert meta["model"] == {"name": "all-MiniLM-L6-v2", "revision": "abc123",
                             "backend": "torch-fp32"}
    assert meta["text"] == "The quick brown fox."
    assert len(body) == 4 * 4
    assert struct.unpack("<4f", body) == tuple(np.float32(v) for v in vector)
    np.testing.assert_array_equal(np.frombuffer(body, dtype="<f4"),
                                  np.asarray(vector, dtype=np.float32))


def test_embedding_layout_float16() -> None:
    """float16 vectors take two little-endian bytes per value after the metadata."""
    vector = [0.5, -0.25, 1.0]
    value = encode_embedding(_embedding(vector), "float16")
    meta = _meta(value)
    body = value[4 + struct.unpack(">I", value[:4])[0] :]
    assert (meta["dtype"], meta["dim"]) == ("float16", 3)
    assert len(body) == 3 * 2
    assert struct.unpack("<3e", body) == (0.5, -0.25, 1.0)


# -- invalid messages ----------------------------------------------------------------------------


def _relayout(meta: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(meta).encode()
    return struct.pack(">I", len(head)) + head + body


def test_missing_schema_header() -> None:
    """A message without vecpipe.schema is invalid."""
    with pytest.raises(InvalidMessage, match=r"no vecpipe\.schema header"):
        decode(encode_chunk(_chunk()), [(VERSION_HEADER, b"1")])
    with pytest.raises(InvalidMessage):
        decode(encode_chunk(_chunk()), None)


def test_unknown_schema_name() -> None:
    """A schema this build does not know is invalid, and the message names it."""
    with pytest.raises(InvalidMessage, match=r"vecpipe\.thing"):
        decode(b"{}", schema_headers("vecpipe.thing"))


def test_unsupported_version() -> None:
    """A newer version of a known schema is invalid, and the message says to upgrade."""
    with pytest.raises(InvalidMessage, match=r"version 2 is not supported.*upgrade"):
        decode(encode_chunk(_chunk()), schema_headers(CHUNK, 2))
    with pytest.raises(InvalidMessage, match="not a whole number"):
        decode(encode_chunk(_chunk()), [(SCHEMA_HEADER, CHUNK.encode()),
                                        (VERSION_HEADER, b"one")])


def test_invalid_json() -> None:
    """A value that is not JSON is invalid."""
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        decode(b'{"tenant_id": "acme",', schema_headers(CHUNK))


def test_invalid_utf8() -> None:
    """A value that is not UTF-8 is invalid, and the message gives the byte."""
    with pytest.raises(InvalidMessage, match="not valid UTF-8 \\(byte 1\\)"):
        decode(b'{\xff"}', schema_headers(CHUNK))


def test_index_beyond_count_is_refused() -> None:
    """chunk_index must lie below chunk_count: a writer would otherwise drop it silently."""
    data = {**_chunk().to_dict(), "chunk_index": 5, "chunk_count": 2}
    with pytest.raises(InvalidMessage, match="chunk_index 5 is not below chunk_count 2"):
        decode(json.dumps(data).encode(), schema_headers(CHUNK))
    data = {**data, "chunk_index": 2**40, "chunk_count": 2**40 + 1}
    with pytest.raises(InvalidMessage, match="invalid at chunk_index"):
        decode(json.dumps(data).encode(), schema_headers(CHUNK))


def test_hash_of_another_text_is_refused() -> None:
    """A content_hash that is not the hash of the text could fetch another text's vector."""
    data = {**_chunk().to_dict(), "content_hash": content_hash("some other text")}
    with pytest.raises(InvalidMessage, match=r"content_hash .* is not the hash of the text"):
        decode(json.dumps(data).encode(), schema_headers(CHUNK))


def test_too_long_text_is_refused_without_quoting_it() -> None:
    """The reason gives the length, not the 200,000 characters."""
    text = "word " * 40_000
    data = {**_chunk().to_dict(), "text": text, "content_hash": content_hash(text)}
    with pytest.raises(InvalidMessage) as caught:
        decode(json.dumps(data).encode(), schema_headers(CHUNK))
    assert str(caught.value) == ("vecpipe.chunk v1 is invalid at text: it is 200000 characters "
                                 "long, and must be at most 100000.")


def test_lone_surrogate_is_refused_and_escaped_pairs_are_not() -> None:
    """JSON can escape half a surrogate pair, which no UTF-8 text holds: refused, with where;
    an escaped pair (an emoji, as ensure_ascii writes it) is ordinary text."""
    data = _chunk().to_dict()
    with pytest.raises(InvalidMessage, match=r"lone surrogate \(U\+D800\) at /text"):
        decode(json.dumps({**data, "text": "broken \ud800 half"}).encode(), schema_headers(CHUNK))
    with pytest.raises(InvalidMessage, match=r"lone surrogate .* at /metadata/k/1"):
        decode(json.dumps({**data, "metadata": {"k": ["x", "\udfff"]}}).encode(),
               schema_headers(CHUNK))
    text = "launch \U0001f680"
    emoji = json.dumps({**data, "text": text, "content_hash": content_hash(text)},
                       ensure_ascii=True).encode()
    assert b"\\ud83d" in emoji
    assert decode(emoji, schema_headers(CHUNK)).text == "launch \U0001f680"  # type: ignore[union-attr]


@pytest.mark.parametrize("field", ["tenant_id", "doc_id", "version", "text", "content_hash"])
def test_missing_required_field(field: str) -> None:
    """A chunk without a required field is invalid."""
    data = _chunk().to_dict()
    del data[field]
    with pytest.raises(InvalidMessage, match=field):
        decode(json.dumps(data).encode(), schema_headers(CHUNK))


def test_delete_without_tenant() -> None:
    """A delete must name its tenant."""
    with pytest.raises(InvalidMessage, match="tenant_id"):
        decode(b'{"doc_id": "d"}', schema_headers(DELETE))


def test_embedding_missing_model() -> None:
    """An embedding without its model block is invalid."""
    value = encode_embedding(_embedding([1.0, 0.0]))
    meta = _meta(value)
    del meta["model"]
    with pytest.raises(InvalidMessage, match="model"):
        decode(_relayout(meta, value[-8:]), schema_headers(EMBEDDING))


@pytest.mark.parametrize("extra", [-4, 4, -1])
def test_wrong_vector_byte_count(extra: int) -> None:
    """A vector body whose size does not match dim and dtype is invalid."""
    value = encode_embedding(_embedding([1.0, 0.0, 0.0]))
    body = value[-12:]
    body = body[:extra] if extra < 0 else body + b"\x00" * extra
    with pytest.raises(InvalidMessage, match="dim 3 of float32 needs 12"):
        decode(_relayout(_meta(value), body), schema_headers(EMBEDDING))


def test_truncated_embedding() -> None:
    """An embedding shorter than its length prefix claims is invalid."""
    value = encode_embedding(_embedding([1.0, 0.0]))
    with pytest.raises(InvalidMessage, match="4-byte length prefix"):
        decode(value[:3], schema_headers(EMBEDDING))
    with pytest.raises(InvalidMessage, match="runs past the end"):
        decode(struct.pack(">I", 10_000) + value[4:50], schema_headers(EMBEDDING))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_vector(bad: float) -> None:
    """A vector with NaN or infinite values is invalid."""
    value = encode_embedding(_embedding([0.5, bad, 0.5]))
    with pytest.raises(InvalidMessage, match="NaN or infinite"):
        decode(value, schema_headers(EMBEDDING))


def test_tombstone() -> None:
    """A record without a value (a tombstone) is invalid."""
    with pytest.raises(InvalidMessage, match="tombstone"):
        decode(None, schema_headers(CHUNK))


def test_document_is_not_read_from_topics() -> None:
    """Whole documents are not accepted on a topic."""
    data = {"tenant_id": "acme", "doc_id": "d", "content": "x", "version": 1}
    with pytest.raises(InvalidMessage, match="not read from this topic"):
        decode(json.dumps(data).encode(), schema_headers(DOCUMENT))


def test_additional_field_is_invalid() -> None:
    """A chunk with a field the schema does not know is invalid."""
    data = _chunk().to_dict()
    data["colour"] = "red"
    with pytest.raises(InvalidMessage):
        decode(json.dumps(data).encode(), schema_headers(CHUNK))


# -- content hash --------------------------------------------------------------------------------


def test_content_hash_folds_whitespace_runs() -> None:
    """Runs of spaces, tabs and newlines, and outer whitespace, do not change the hash."""
    assert content_hash("hello   world\n\tagain") == content_hash(" hello world again ")
    assert normalize_text("  a \n\n b\t") == "a b"
    assert content_hash("hello world") != content_hash("helloworld")


def test_content_hash_is_invariant_to_unicode_normal_forms() -> None:
    """NFC and NFD spellings of the same text hash the same."""
    text = "Crème brûlée à Åre"
    nfc, nfd = unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)
    assert nfc != nfd
    assert content_hash(nfc) == content_hash(nfd)
    assert len(content_hash(nfc)) == 64


# -- documents -----------------------------------------------------------------------------------


def test_document_version_from_updated_at() -> None:
    """Without version, updated_at gives the version in microseconds since the epoch."""
    updated = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    doc = Document.from_dict({"tenant_id": "acme", "doc_id": "d", "content": "text",
                              "updated_at": updated.isoformat()})
    expected = (updated - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert doc.version == expected == 1714566615123456


def test_document_version_from_offset_time() -> None:
    """A non-UTC offset is honoured when deriving the version."""
    doc = Document.from_dict({"tenant_id": "acme", "doc_id": "d", "content": "text",
                              "updated_at": "2024-05-01T14:30:15.123456+02:00"})
    assert doc.version == 1714566615123456


def test_document_explicit_version_and_default_tenant() -> None:
    """An explicit version wins, and the default tenant fills a missing tenant_id."""
    doc = Document.from_dict({"doc_id": "d", "content": "text", "version": 5,
                              "updated_at": "2024-05-01T00:00:00+00:00"}, default_tenant="t1")
    assert (doc.tenant_id, doc.version) == ("t1", 5)


def test_document_without_version_or_updated_at() -> None:
    """A document with neither version nor updated_at is refused."""
    with pytest.raises(InvalidMessage, match="neither version nor updated_at"):
        Document.from_dict({"tenant_id": "acme", "doc_id": "d", "content": "text"})


def test_document_with_slash_in_tenant() -> None:
    """A tenant with '/' would break the key; the schema refuses it."""
    with pytest.raises(InvalidMessage, match="tenant_id"):
        Document.from_dict({"tenant_id": "a/b", "doc_id": "d", "content": "x", "version": 1})


# -- the bounds every record is held to (issue: one record can only hurt itself) -----------------

def _chunk_json(**changes: Any) -> bytes:
    data = _chunk().to_dict()
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("value", "says"), [
    (b'{"tenant_id": "acme", "version": ' + b"9" * 5000 + b"}", "4,300 digits"),
    (b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deeper than 16 levels"),
    (_chunk_json(metadata={"a": json.loads("[" * 20 + "]" * 20)}), "deeper than 16 levels"),
    (_chunk_json(char_start=3_000_000_000), "invalid at char_start"),
    (_chunk_json(char_end=2**63), "invalid at char_end"),
    (_chunk_json(char_start=1e300), "invalid at char_start"),
    (_chunk_json(metadata={f"k{i}": "v" * 100 for i in range(1000)}), "metadata is"),
    (b" " * (MAX_VALUE_BYTES + 1), f"more than the {MAX_VALUE_BYTES}"),
], ids=["huge-integer", "deep-nesting", "deep-metadata", "char-start-beyond-int4",
        "char-end-beyond-int8", "integral-float", "huge-metadata", "oversized-value"])
def test_values_past_the_bounds_are_refused_with_a_sentence(value: bytes, says: str) -> None:
    """Integers Python will not parse, nesting past the recursion limit, integers the columns
    cannot hold, integral floats, huge metadata and huge values: each is an InvalidMessage with
    its reason, never another exception (which would stop the stage on every redelivery)."""
    with pytest.raises(InvalidMessage, match=says):
        decode(value, schema_headers(CHUNK))


def test_the_largest_valid_chunk_fits_the_bounds() -> None:
    """A chunk at the contract's limits (100,000 characters of text, metadata at the cap) is
    within the value cap: the bounds refuse nothing the contract allows."""
    text = "é" * 100_000
    meta = {"blob": "x" * (MAX_METADATA_BYTES - 20)}
    chunk = _chunk(text, metadata=meta, char_end=len(text))
    value = encode_chunk(chunk)
    assert len(value) <= MAX_VALUE_BYTES
    assert decode(value, schema_headers(CHUNK)) == chunk


def test_a_publish_time_comes_from_the_header_else_the_timestamp() -> None:
    """The header wins; without it the Kafka timestamp counts; without either, the epoch."""
    when = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert published_at([published_header(when)], (1, 1)) == when
    assert published_at([], (1, 1_714_564_800_000)) == when
    assert published_at([], (0, -1)) == datetime(1970, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidMessage, match="is not an ISO 8601 time"):
        published_at([("vecpipe.published_at", b"yesterday")], (1, 1))


def test_a_publish_time_far_in_the_future_is_refused() -> None:
    """A clock far ahead would let a delete hold off every later version until then (or a
    version outlive every delete): beyond MAX_CLOCK_SKEW the record is refused, within it
    accepted as it is."""
    soon = datetime.now(UTC) + MAX_CLOCK_SKEW / 2
    assert published_at([published_header(soon)], (1, 1)) == soon
    far = datetime.now(UTC) + MAX_CLOCK_SKEW * 2
    with pytest.raises(InvalidMessage, match="ahead of this worker's clock; fix the publisher"):
        published_at([published_header(far)], (1, 1))
    with pytest.raises(InvalidMessage, match="timestamp"):
        published_at([], (1, int(far.timestamp() * 1000)))
    with pytest.raises(InvalidMessage, match="9999"):
        published_at([("vecpipe.published_at", b"9999-12-31T23:59:59+00:00")], (1, 1))
