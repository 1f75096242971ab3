"""Hypothesis strategies for the fuzzer: chunk and embedding records, mostly near the contract.

Records are built from values at and around every bound of ``schemas/chunk.v1.json`` and
``schemas/embedding.v1.json`` (integers past int4 and int8, integral and fractional floats,
NUL and lone surrogates, deep and large metadata, wrong hashes, extra and missing fields), then
some are mutated at the byte level. ``VECPIPE_FUZZ_EXAMPLES`` sets how many examples a property
tries (default 150, bounded for ``make test``; set it to thousands for a long run).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from vecpipe.messages import content_hash

__all__ = ["FUZZ", "chunk_values", "embedding_values"]

FUZZ = settings(max_examples=int(os.environ.get("VECPIPE_FUZZ_EXAMPLES", "150")),
                deadline=None, derandomize=os.environ.get("VECPIPE_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# A literal longer than Python converts: json.dumps cannot write it, so a token stands for it.
_HUGE = "__integer_of_4400_digits__"
_INT_EDGES: list[Any] = [0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, _HUGE]
integers = st.one_of(st.integers(0, 50), st.sampled_from(_INT_EDGES),
                     st.sampled_from([1e300, 3.0, 2.5, float("inf")]),
                     st.integers(-(2**70), 2**70))
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "a\x00b", "\ud800 lone", "é" * 100_001, "ok text", "/slash"]),
)
json_leaf = st.one_of(st.none(), st.booleans(), integers, texts,
                      st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=12)
metadata = st.one_of(
    st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    st.just({"deep": json.loads("[" * 20 + "]" * 20)}),
    st.just({"big": "v" * 70_000}),
    st.sampled_from([[], "not an object", None]),
)


@st.composite
def chunk_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A chunk object near the contract: each field valid, or an edge case of its own."""
    text = draw(st.one_of(st.just("some valid text"), texts))
    data: dict[str, Any] = {
        "tenant_id": draw(st.one_of(st.just("acme"), texts)),
        "doc_id": draw(st.one_of(st.just("doc-1"), texts)),
        "version": draw(st.one_of(st.just(1), integers)),
        "chunk_index": draw(st.one_of(st.just(0), integers)),
        "chunk_count": draw(st.one_of(st.just(1), integers)),
        "text": text,
        "content_hash": draw(st.one_of(st.just(_hash(text)), st.just("0" * 64), texts)),
    }
    for name, values in (("char_start", integers), ("char_end", integers),
                         ("source_uri", texts), ("metadata", metadata)):
        if draw(st.booleans()):
            data[name] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        data.pop(draw(st.sampled_from(sorted(data))))
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return data


def _hash(text: str) -> str:
    try:
        return content_hash(text)
    except UnicodeEncodeError:
        return "0" * 64


def _json(data: Any) -> bytes:
    # ensure_ascii: lone surrogates travel escaped, as a hostile producer would send them.
    text = json.dumps(data, ensure_ascii=True)
    return text.replace(f'"{_HUGE}"', "9" * 4400).encode()


@st.composite
def mutated(draw: st.DrawFn, value: bytes) -> bytes:
    """``value`` as it is, truncated, or with one byte changed."""
    kind = draw(st.integers(0, 5))
    if kind == 0 and value:
        return value[: draw(st.integers(0, len(value) - 1))]
    if kind == 1 and value:
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + bytes([draw(st.integers(0, 255))]) + value[i + 1:]
    return value


chunk_values = chunk_dicts().map(_json).flatmap(mutated)


@st.composite
def embedding_values(draw: st.DrawFn) -> bytes:
    """An embedding message: a chunk object with model fields, and a vector of some length."""
    data = draw(chunk_dicts())
    data.update(model={"name": "fuzz", "revision": "1", "backend": "torch-fp32"},
                embedded_at="2024-05-01T12:00:00+00:00",
                dtype=draw(st.sampled_from(["float32", "float16", "float64"])),
                dim=draw(st.one_of(st.just(8), integers)))
    dim = draw(st.sampled_from([8, 8, 8, 7, 0]))
    vec = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(dim)
    if dim and draw(st.booleans()):
        vec = vec / np.linalg.norm(vec)
    if dim and draw(st.integers(0, 9)) == 0:
        vec[0] = np.nan
    dtype = "<f2" if data["dtype"] == "float16" else "<f4"
    head = _json(data)
    value = struct.pack(">I", len(head)) + head + vec.astype(dtype).tobytes()
    return draw(mutated(value))
