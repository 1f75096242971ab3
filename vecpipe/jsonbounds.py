"""The bounds every record's JSON is held to while it is parsed (documented in ``schemas/``).

Each failure is an :class:`~vecpipe.errors.InvalidMessage` with one sentence: the record alone
is dead-lettered, and no hostile value (deep nesting, a lone surrogate, a NUL PostgreSQL cannot
store, oversized metadata) can exhaust the stack or fail later in the tokenizer or the database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from vecpipe.errors import InvalidMessage

__all__ = ["MAX_DEPTH", "MAX_METADATA_BYTES", "MAX_VALUE_BYTES", "check_metadata", "parse_json",
           "refuse_nul"]


# Bounds every record is held to before and while it is parsed (documented in schemas/): a value
# at most MAX_VALUE_BYTES long, containers nested at most MAX_DEPTH deep, and metadata of at most
# MAX_METADATA_BYTES once serialized. The largest valid chunk (100,000 characters of text) fits.
MAX_VALUE_BYTES = 2 * 1024 * 1024
MAX_DEPTH = 16
MAX_METADATA_BYTES = 65_536

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(value: bytes) -> Any:
    """``value`` as JSON, or InvalidMessage with a sentence: UTF-8, syntax, depth, integer
    size and lone surrogates are checked, iteratively."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"the value is not valid UTF-8 (byte {exc.start}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"the value is not valid JSON: {exc.msg} at {exc.pos}.") from None
    except RecursionError:
        raise InvalidMessage(
            f"the value nests arrays or objects deeper than {MAX_DEPTH} levels.") from None
    except ValueError:
        # An integer literal of more digits than Python converts (4,300 by default).
        raise InvalidMessage(
            "the value has an integer of more than 4,300 digits, which no field can hold."
        ) from None
    _walk(data, has_escapes=_SURROGATE_ESCAPE.search(value) is not None)
    return data


def _walk(data: Any, *, has_escapes: bool) -> None:
    """Refuse containers nested deeper than MAX_DEPTH, and (only escaped values can have one)
    half of a surrogate pair ("\\ud800"), which no UTF-8 text can hold: the tokenizer and
    PostgreSQL would both fail on it later. Iterative: a hostile depth cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise InvalidMessage(
                    f"the value nests arrays or objects deeper than {MAX_DEPTH} levels "
                    f"(at {where or 'the top level'}).")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if has_escapes and isinstance(key, str):
                    _refuse_lone_surrogate(key, f"a key of {where or 'the top level'}")
                stack.append((child, f"{where}/{key}", depth + 1))
        elif has_escapes and isinstance(item, str):
            _refuse_lone_surrogate(item, where)


def _refuse_lone_surrogate(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessage(
            f"the value has a lone surrogate (U+{ord(text[exc.start]):04X}) at "
            f"{where or 'the top level'}, which is not valid Unicode."
        ) from None


def refuse_nul(data: Any) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000: a chunk carrying one anywhere (text,
    source_uri, metadata) can never be stored, so it is refused before any work is spent."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidMessage(
                    f"the chunk has a NUL character (U+0000) at {where or 'the top level'}, "
                    "which PostgreSQL text cannot store; remove it before publishing.")
        elif isinstance(item, dict):
            stack.extend((k, f"a key of {where or 'the top level'}") for k in item)
            stack.extend((v, f"{where}/{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(item))


def check_metadata(data: Mapping[str, Any], size: int) -> None:
    """Metadata travels with every chunk of a document: bound it. ``size`` is the record's."""
    metadata = data.get("metadata")
    if not metadata or size <= MAX_METADATA_BYTES:
        return
    encoded = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if encoded > MAX_METADATA_BYTES:
        raise InvalidMessage(
            f"the metadata is {encoded} bytes as JSON, more than the {MAX_METADATA_BYTES} a "
            "chunk may carry (it travels with every chunk); keep large values in the document "
            "store and reference them.")
