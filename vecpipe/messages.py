"""The wire contracts of schemas/, as Python values: documents, chunks, embeddings and deletes.

Every message carries its schema name and version in the headers ``vecpipe.schema`` and
``vecpipe.schema.version``. Chunk and delete values are UTF-8 JSON; an embedding value is a
length-prefixed JSON metadata block followed by the raw little-endian vector (see
``schemas/embedding.v1.json``). Decoding validates against the same JSON Schema files that
upstream teams read, and raises :class:`InvalidMessage` with a one-sentence reason.
"""

from __future__ import annotations

import hashlib
import json
import struct
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import fastjsonschema
import numpy as np
import numpy.typing as npt
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from vecpipe.errors import InvalidMessage
from vecpipe.jsonbounds import (
    MAX_DEPTH,
    MAX_METADATA_BYTES,
    MAX_VALUE_BYTES,
    check_metadata,
    parse_json,
    refuse_nul,
)
from vecpipe.resources import resource_dir

__all__ = [
    "CHUNK",
    "DELETE",
    "DOCUMENT",
    "EMBEDDING",
    "GAP",
    "MAX_CLOCK_SKEW",
    "MAX_DEPTH",
    "MAX_METADATA_BYTES",
    "MAX_VALUE_BYTES",
    "PUBLISHED_HEADER",
    "SCHEMA_HEADER",
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "TRACE_HEADERS",
    "VERSION_HEADER",
    "Chunk",
    "ChunkGap",
    "Delete",
    "Document",
    "Embedding",
    "HeaderLike",
    "Headers",
    "check_chunk",
    "check_delete",
    "content_hash",
    "decode",
    "document_key",
    "encode_chunk",
    "encode_delete",
    "encode_embedding",
    "encode_gap",
    "header_list",
    "header_value",
    "load_schema",
    "normalize_text",
    "published_at",
    "published_header",
    "schema_headers",
    "with_published_at",
]

SCHEMA_HEADER = "vecpipe.schema"
VERSION_HEADER = "vecpipe.schema.version"
# When the document version (or the delete) was first published, ISO 8601 in UTC. Its first
# publisher sets it; every stage, dead letter and replay carries it unchanged, and the writer
# decides "published before the delete" from it, never from a Kafka timestamp (a topic may use
# LogAppendTime, a replay is sent anew).
PUBLISHED_HEADER = "vecpipe.published_at"
# An upstream's W3C Trace Context (https://www.w3.org/TR/trace-context/), optional. Every stage
# carries a well-formed one onto what it makes of the record, and dead letters and replays keep
# it, so that one document's trace is followed across stages (``vecpipe.tracing`` links to it).
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
TRACE_HEADERS = (TRACEPARENT_HEADER, TRACESTATE_HEADER)
DOCUMENT = "vecpipe.document"
CHUNK = "vecpipe.chunk"
EMBEDDING = "vecpipe.embedding"
DELETE = "vecpipe.delete"
GAP = "vecpipe.chunk.gap"
# Schema name -> the versions this build understands, and its file in schemas/.
SUPPORTED: dict[str, dict[int, str]] = {
    DOCUMENT: {1: "document.v1.json"},
    CHUNK: {1: "chunk.v1.json"},
    EMBEDDING: {1: "embedding.v1.json"},
    DELETE: {1: "delete.v1.json"},
    GAP: {1: "chunk-gap.v1.json"},
}
_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_LEN = struct.Struct(">I")

Headers = list[tuple[str, bytes]]
# What confluent-kafka hands out or accepts as headers.
HeaderLike = Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None


def header_list(headers: HeaderLike) -> Headers:
    """Headers as a list of (name, bytes) pairs, whatever form they came in."""
    if headers is None:
        return []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs]


@cache
def load_schema(filename: str) -> dict[str, Any]:
    """Load one JSON Schema file shipped in the ``schemas/`` folder."""
    text = resource_dir("schemas").joinpath(filename).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(name: str, version: int) -> Draft202012Validator:
    return Draft202012Validator(load_schema(SUPPORTED[name][version]))


def normalize_text(text: str) -> str:
    """Canonical form for hashing: Unicode NFC, whitespace runs folded to one space, trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def content_hash(text: str) -> str:
    """sha256 (hex) of the normalized text: equal hashes mean the model sees the same input."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def document_key(tenant_id: str, doc_id: str) -> bytes:
    """The Kafka key of a document: its chunks and its deletes share a partition, in order."""
    return f"{tenant_id}/{doc_id}".encode()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Document:
    """A document published by an upstream system; ``version`` grows with every change."""

    tenant_id: str
    doc_id: str
    content: str
    version: int
    source_uri: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def version_from(updated_at: datetime) -> int:
        """A monotonic version from an updated-at timestamp: microseconds since the epoch."""
        if updated_at.tzinfo is None:
            updated_at = updated_at.replace(tzinfo=UTC)
        return int(updated_at.timestamp() * 1_000_000)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_tenant: str = "default") -> Document:
        """Build a document from its JSON form (schemas/document.v1.json), validating it."""
        data = dict(data)
        data.setdefault("tenant_id", default_tenant)
        _check(DOCUMENT, 1, data)
        version = data.get("version")
        if version is None:
            updated = data.get("updated_at")
            if updated is None:
                raise InvalidMessage(
                    f"document {data['doc_id']!r} has neither version nor updated_at; "
                    "give one so that newer versions can win."
                )
            version = cls.version_from(datetime.fromisoformat(updated))
        return cls(
            tenant_id=data["tenant_id"],
            doc_id=data["doc_id"],
            content=data["content"],
            version=int(version),
            source_uri=data.get("source_uri", ""),
            metadata=data.get("metadata", {}),
        )


@dataclass(frozen=True)
class Chunk:
    """One piece of a document, small enough for the model, as it travels on the chunks topic."""

    tenant_id: str
    doc_id: str
    version: int
    chunk_index: int
    chunk_count: int
    text: str
    content_hash: str
    char_start: int
    char_end: int
    source_uri: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        """Kafka key of the chunk's document."""
        return document_key(self.tenant_id, self.doc_id)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of schemas/chunk.v1.json."""
        return {
            "tenant_id": self.tenant_id,
            "doc_id": self.doc_id,
            "version": self.version,
            "chunk_index": self.chunk_index,
            "chunk_count": self.chunk_count,
            "text": self.text,
            "content_hash": self.content_hash,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "source_uri": self.source_uri,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Chunk:
        """Build a chunk from its schema-validated JSON form, checking what a schema cannot:
        the index lies within the count, and the hash is the hash of this text (a wrong one
        would let the embedder reuse the vector of another text)."""
        if data["chunk_index"] >= data["chunk_count"]:
            raise InvalidMessage(
                f"chunk_index {data['chunk_index']} is not below chunk_count "
                f"{data['chunk_count']}: a version's chunks are numbered 0 to chunk_count - 1."
            )
        actual = content_hash(data["text"])
        if data["content_hash"] != actual:
            raise InvalidMessage(
                f"content_hash {data['content_hash'][:12]}... is not the hash of the text "
                f"({actual[:12]}...): sha256 of the text after NFC, whitespace folding and "
                "trimming."
            )
        return cls(
            tenant_id=data["tenant_id"],
            doc_id=data["doc_id"],
            version=int(data["version"]),
            chunk_index=int(data["chunk_index"]),
            chunk_count=int(data["chunk_count"]),
            text=data["text"],
            content_hash=data["content_hash"],
            char_start=int(data.get("char_start", 0)),
            char_end=int(data.get("char_end", len(data["text"]))),
            source_uri=data.get("source_uri", ""),
            metadata=data.get("metadata", {}),
        )


@dataclass(frozen=True)
class Delete:
    """Removal of one document (``doc_id`` set) or of a whole tenant (``doc_id`` None)."""

    tenant_id: str
    doc_id: str | None = None
    version: int | None = None
    requested_at: str = field(default_factory=_now_iso)
    reason: str = ""

    @property
    def key(self) -> bytes:
        """A document delete shares its document's key, so it is ordered after its chunks."""
        return document_key(self.tenant_id, self.doc_id or "")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of schemas/delete.v1.json."""
        out: dict[str, Any] = {"tenant_id": self.tenant_id, "requested_at": self.requested_at}
        if self.doc_id is not None:
            out["doc_id"] = self.doc_id
        if self.version is not None:
            out["version"] = self.version
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class ChunkGap:
    """A chunk of a version that will not arrive (dead-lettered by the embed stage): the writer
    empties its slot rather than keep an older version's text there."""

    tenant_id: str
    doc_id: str
    version: int
    chunk_index: int
    chunk_count: int
    content_hash: str
    reason: str = ""

    @property
    def key(self) -> bytes:
        """Kafka key of the chunk's document."""
        return document_key(self.tenant_id, self.doc_id)

    @classmethod
    def of(cls, chunk: Chunk, reason: str) -> ChunkGap:
        """The gap that ``chunk``, dead-lettered for ``reason``, leaves."""
        return cls(chunk.tenant_id, chunk.doc_id, chunk.version, chunk.chunk_index,
                   chunk.chunk_count, chunk.content_hash, reason[:2000])


@dataclass(frozen=True)
class Embedding:
    """A chunk with its vector and the model that made it, as it travels on the embeddings topic."""

    chunk: Chunk
    vector: npt.NDArray[np.float32]
    model_name: str
    model_revision: str
    backend: str
    embedded_at: str = field(default_factory=_now_iso)


def schema_headers(name: str, version: int = 1) -> Headers:
    """The headers that name a message's schema and version."""
    return [(SCHEMA_HEADER, name.encode()), (VERSION_HEADER, str(version).encode())]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How far ahead of this machine's clock a publish time may be. A time further ahead is a wrong
# clock, and would let a delete hold off every later version (or a version outlive every delete)
# until that time: such a record is refused, and can be replayed once the time has passed.
MAX_CLOCK_SKEW = timedelta(hours=1)


def published_header(when: datetime | None = None) -> tuple[str, bytes]:
    """The ``vecpipe.published_at`` header for ``when`` (default: now)."""
    when = when or datetime.now(UTC)
    return (PUBLISHED_HEADER, when.astimezone(UTC).isoformat(timespec="microseconds").encode())


def published_at(headers: HeaderLike, timestamp: tuple[int, int], *,
                 check_clock: bool = True) -> datetime:
    """When a record's version or delete was first published: its ``vecpipe.published_at``
    header, else (a record some other client built) its Kafka timestamp, else the epoch.

    Raises InvalidMessage when the header is there but is not an ISO 8601 time, or (with
    ``check_clock``) when the time is more than :data:`MAX_CLOCK_SKEW` ahead of now.
    """
    text = header_value(headers, PUBLISHED_HEADER)
    if text is not None:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidMessage(
                f"the {PUBLISHED_HEADER} header {text[:40]!r} is not an ISO 8601 time.") from None
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        what = f"the {PUBLISHED_HEADER} header {text[:40]!r}"
    else:
        ts = timestamp[1]
        try:
            when = datetime.fromtimestamp(ts / 1000, UTC) if ts and ts > 0 else _EPOCH
        except (OverflowError, OSError, ValueError):
            raise InvalidMessage(f"the record's timestamp {ts} is not a time.") from None
        what = f"the record's timestamp {when.isoformat()}"
    if check_clock and when > datetime.now(UTC) + MAX_CLOCK_SKEW:
        raise InvalidMessage(
            f"{what} is more than {MAX_CLOCK_SKEW} ahead of this worker's clock; fix the "
            "publisher's clock and publish the record again (a replay keeps this time).")
    return when


def with_published_at(headers: HeaderLike, timestamp: tuple[int, int]) -> Headers:
    """``headers`` with a ``vecpipe.published_at`` header, taken from the Kafka timestamp when
    the record has none (so that it survives a topic with LogAppendTime and a replay)."""
    kept = header_list(headers)
    if any(k == PUBLISHED_HEADER for k, _ in kept):
        return kept
    try:
        return [*kept, published_header(published_at(kept, timestamp))]
    except InvalidMessage:
        return kept


def header_value(headers: HeaderLike, name: str) -> str | None:
    """The last value of header ``name`` as text, or None."""
    found: str | None = None
    for key, value in header_list(headers):
        if key == name:
            found = value.decode("utf-8", "replace")
    return found


@cache
def _compiled(name: str, version: int) -> Callable[[Any], Any]:
    # fastjsonschema compiles the same schema files to Python: about 50 times faster than
    # jsonschema's validator, which matters at GPU speeds and for the writer's throughput.
    validate: Callable[[Any], Any] = fastjsonschema.compile(load_schema(SUPPORTED[name][version]))
    return validate


def _check(name: str, version: int, data: Any) -> None:
    try:
        _compiled(name, version)(data)
        return
    except fastjsonschema.JsonSchemaException as fast:
        refusal = str(getattr(fast, "message", fast))
    # Only invalid messages get here: jsonschema says precisely where and why.
    try:
        _validator(name, version).validate(data)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the message"
        raise InvalidMessage(f"{name} v{version} is invalid at {where}: {_reason(exc)}.") from None
    raise InvalidMessage(f"{name} v{version} is invalid: {refusal}.")


def _reason(exc: ValidationError) -> str:
    """jsonschema's reason, without quoting a huge value back (a 5 MB text, say)."""
    value = exc.instance
    if exc.validator in ("maxLength", "minLength") and isinstance(value, str):
        bound = "at most" if exc.validator == "maxLength" else "at least"
        return f"it is {len(value)} characters long, and must be {bound} {exc.validator_value}"
    reason = exc.message
    return reason if len(reason) <= _MAX_REASON else reason[:_MAX_REASON] + "..."


_MAX_REASON = 300


def encode_chunk(chunk: Chunk) -> bytes:
    """Serialize a chunk as UTF-8 JSON."""
    return json.dumps(chunk.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()


def encode_gap(gap: ChunkGap) -> bytes:
    """Serialize a chunk gap as UTF-8 JSON."""
    return json.dumps(asdict(gap), ensure_ascii=False, separators=(",", ":")).encode()


def encode_delete(delete: Delete) -> bytes:
    """Serialize a delete as UTF-8 JSON."""
    return json.dumps(delete.to_dict(), separators=(",", ":")).encode()


def encode_embedding(emb: Embedding, dtype: str = "float32") -> bytes:
    """Length-prefixed JSON metadata, then the vector as little-endian float32 or float16."""
    vec = np.asarray(emb.vector).astype(_DTYPES[dtype])
    meta = emb.chunk.to_dict()
    meta.update(
        model={"name": emb.model_name, "revision": emb.model_revision, "backend": emb.backend},
        embedded_at=emb.embedded_at,
        dtype=dtype,
        dim=int(vec.shape[0]),
    )
    head = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
    return bytes(_LEN.pack(len(head)) + head + vec.tobytes())


_NUL_ESCAPE = b"\\u0000"


def _schema_of(headers: HeaderLike) -> tuple[str, int]:
    name = header_value(headers, SCHEMA_HEADER)
    raw_version = header_value(headers, VERSION_HEADER)
    if name is None:
        raise InvalidMessage(f"the message has no {SCHEMA_HEADER} header naming its schema.")
    if name not in SUPPORTED:
        raise InvalidMessage(f"unknown schema {name!r}; known: {', '.join(SUPPORTED)}.")
    try:
        version = int(raw_version or "")
    except ValueError:
        raise InvalidMessage(
            f"{VERSION_HEADER} header is {raw_version!r}, not a whole number."
        ) from None
    if version not in SUPPORTED[name]:
        raise InvalidMessage(
            f"{name} version {version} is not supported by this worker "
            f"(supported: {', '.join(map(str, SUPPORTED[name]))}); upgrade the worker or replay "
            "the record to one that is."
        )
    return name, version


def _decode_embedding(value: bytes, version: int) -> Embedding:
    if len(value) < _LEN.size:
        raise InvalidMessage("the embedding value is shorter than its 4-byte length prefix.")
    (size,) = _LEN.unpack_from(value)
    if _LEN.size + size > len(value):
        raise InvalidMessage(
            f"the embedding metadata length {size} runs past the end of the value."
        )
    block = value[_LEN.size : _LEN.size + size]
    meta = parse_json(block)
    _check(EMBEDDING, version, meta)
    check_metadata(meta, size)
    if _NUL_ESCAPE in block:
        refuse_nul(meta)
    dtype = _DTYPES[meta["dtype"]]
    body = value[_LEN.size + size :]
    if len(body) != meta["dim"] * dtype.itemsize:
        raise InvalidMessage(
            f"the vector has {len(body)} bytes but dim {meta['dim']} of {meta['dtype']} needs "
            f"{meta['dim'] * dtype.itemsize}."
        )
    vec = np.frombuffer(body, dtype=dtype).astype(np.float32)
    if not np.all(np.isfinite(vec)):
        raise InvalidMessage("the vector contains NaN or infinite values.")
    model = meta["model"]
    return Embedding(
        chunk=Chunk.from_dict(meta),
        vector=vec,
        model_name=model["name"],
        model_revision=model.get("revision", ""),
        backend=model.get("backend", ""),
        embedded_at=meta["embedded_at"],
    )


def check_chunk(chunk: Chunk) -> None:
    """Raise InvalidMessage unless ``chunk`` is one the pipeline will take: every check the
    embed stage makes on the wire, made before it is sent (publishers call it)."""
    decode(encode_chunk(chunk), schema_headers(CHUNK))


def check_delete(delete: Delete) -> None:
    """Raise InvalidMessage unless ``delete`` is one the pipeline will take."""
    decode(encode_delete(delete), schema_headers(DELETE))


def decode(value: bytes | None,
           headers: HeaderLike) -> Chunk | Delete | Embedding | ChunkGap:
    """Decode and validate one message by the schema its headers name."""
    if value is None:
        raise InvalidMessage("the message has no value (a tombstone is not a vecpipe message).")
    name, version = _schema_of(headers)
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidMessage(
            f"the value is {len(value)} bytes, more than the {MAX_VALUE_BYTES} a {name} message "
            "may have.")
    if name == EMBEDDING:
        return _decode_embedding(value, version)
    data = parse_json(value)
    _check(name, version, data)
    if name == CHUNK:
        check_metadata(data, len(value))
        if _NUL_ESCAPE in value:
            refuse_nul(data)
        return Chunk.from_dict(data)
    if name == GAP:
        if data["chunk_index"] >= data["chunk_count"]:
            raise InvalidMessage("the gap's chunk_index is not below its chunk_count.")
        return ChunkGap(**data)
    if name == DELETE:
        return Delete(
            tenant_id=data["tenant_id"],
            doc_id=data.get("doc_id"),
            version=data.get("version"),
            requested_at=data.get("requested_at", ""),
            reason=data.get("reason", ""),
        )
    raise InvalidMessage(
        f"{name} messages are not read from this topic; publish documents through a producer."
    )
