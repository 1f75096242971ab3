"""The HTTP API's request and response bodies (pydantic; they are also the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DocumentIn", "DocumentStatus", "SearchHit", "SearchRequest", "SearchResponse"]


class SearchRequest(BaseModel):
    """``POST /v1/search``: a text ``query`` or a ``vector``, and how to match it."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, max_length=8192, description="the query's text")
    vector: list[float] | None = Field(
        None, description="a query vector of the table's dimension, instead of a text "
        "(vector mode only)")
    k: int = Field(10, ge=1, description="how many results (at most serve.max_k)")
    mode: Literal["vector", "keyword", "hybrid"] = Field(
        "vector", description="nearest embeddings, full-text match, or both fused by "
        "reciprocal rank")
    filter: dict[str, Any] | None = Field(
        None, description="metadata filter: field values and $eq $ne $in $nin $gt $gte $lt "
        "$lte $exists $and $or $not")
    ef_search: int | None = Field(None, ge=1, le=1000, description="HNSW ef_search for this "
                                  "query (default: scaled to the share of rows it selects)")


class SearchHit(BaseModel):
    """One ranked chunk."""

    doc_id: str
    chunk_index: int
    version: int
    score: float = Field(description="higher is better: similarity, text rank or fused rank")
    distance: float | None = Field(description="vector distance; null in keyword mode")
    content: str
    source_uri: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    """The hits, how they were found and where the time went."""

    hits: list[SearchHit]
    mode: str
    strategy: dict[str, Any]
    timings_ms: dict[str, float]


class DocumentIn(BaseModel):
    """One document to publish; ``version`` defaults to the time of the request in
    microseconds, so a later request wins."""

    model_config = ConfigDict(extra="forbid")

    doc_id: str = Field(min_length=1, max_length=512)
    content: str
    version: int | None = Field(None, ge=0)
    updated_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    source_uri: str = Field("", max_length=2048)


class DocumentStatus(BaseModel):
    """``GET /v1/documents/{doc_id}``: what is stored, so an upstream can tell when its version
    is searchable."""

    doc_id: str
    version: int
    deleted: bool
    chunk_count: int
    chunks_stored: int
    searchable: bool
    model: str | None
    updated_at: datetime
    written_at: datetime | None
