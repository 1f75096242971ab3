"""Metadata filters: ``$eq $ne $in $nin $gt $gte $lt $lte $exists $and $or $not``, compiled.

A filter compiles to two values, never to SQL text, so that nothing a caller writes can reach
the statement: ``contain``, a jsonb object matched with containment (``metadata @> contain``),
and ``path``, a SQL/JSON path predicate matched with ``metadata @@ path``. Both operators are
served by the GIN ``jsonb_path_ops`` index on metadata: containment wholly, and ``@@`` for the
equalities it holds (``$."lang" == "en"``), which is how a scalar equality compiles (it also
matches a list that holds the value, which containment would not). A top-level field whose
value is an object or a list is matched by containment (``{"tags": ["a", "b"]}``: both tags).

The semantics are MongoDB's, as LangChain's and LlamaIndex's PGVector stores follow them: a
field that is a list matches when any element does (``{"tags": "red"}``, ``$in``, ``$gt``); a
missing field never matches a comparison, and always matches ``$ne`` and ``$nin``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vecpipe.errors import SearchError

__all__ = ["MAX_CLAUSES", "MAX_DEPTH", "CompiledFilter", "FilterError", "compile_filter"]

MAX_DEPTH = 8
MAX_CLAUSES = 64
MAX_LIST = 256
MAX_KEY_CHARS = 256

_COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_FIELD_OPS = ("$eq", "$ne", "$in", "$nin", "$exists", *_COMPARE)
_LOGICAL = ("$and", "$or", "$not")


class FilterError(SearchError):
    """A filter that cannot be compiled; the message names the part that is wrong."""


@dataclass(frozen=True)
class CompiledFilter:
    """``metadata @> contain AND metadata @@ path`` (either part may be absent)."""

    contain: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def empty(self) -> bool:
        """True when the filter keeps every row."""
        return not self.contain and self.path is None


def compile_filter(spec: Mapping[str, Any] | None) -> CompiledFilter:
    """Compile a filter, or raise FilterError with a sentence naming the wrong part."""
    if spec is None:
        return CompiledFilter()
    if not isinstance(spec, Mapping):
        raise FilterError(f"filter: must be a JSON object, got {_kind(spec)}.")
    counter = _Counter()
    contain: dict[str, Any] = {}
    rest: list[str] = []
    for where, key, value in _conjunction(spec, "filter"):
        literal = value["$eq"] if _is_eq(value) else value
        if not key.startswith("$") and isinstance(literal, (Mapping, list)):
            if isinstance(literal, Mapping) and any(str(k).startswith("$") for k in literal):
                rest.append(_clause(key, value, where, 1, counter))
                continue
            _check_key(key, where)
            _check_containable(literal, where)
            if key in contain:
                raise FilterError(f"{where}: the field {key!r} is matched by containment twice; "
                                  "merge the two values into one.")
            counter.add(where)
            contain[key] = literal
            continue
        rest.append(_clause(key, value, where, 1, counter))
    return CompiledFilter(contain, " && ".join(rest) if rest else None)


class _Counter:
    def __init__(self) -> None:
        self.clauses = 0

    def add(self, where: str) -> None:
        self.clauses += 1
        if self.clauses > MAX_CLAUSES:
            raise FilterError(f"{where}: a filter may hold at most {MAX_CLAUSES} conditions.")


def _conjunction(spec: Mapping[str, Any], where: str) -> list[tuple[str, str, Any]]:
    """The (where, key, value) terms of a top-level AND, ``$and`` lists flattened into it."""
    terms: list[tuple[str, str, Any]] = []
    for key, value in spec.items():
        if key == "$and":
            for i, item in enumerate(_list_of_objects(value, f"{where}.$and")):
                terms.extend(_conjunction(item, f"{where}.$and[{i}]"))
        else:
            terms.append((f"{where}.{key}", key, value))
    return terms


def _is_eq(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"$eq"}


def _clause(key: str, value: Any, where: str, depth: int, counter: _Counter) -> str:
    """One ``key: value`` term as a jsonpath predicate."""
    if depth > MAX_DEPTH:
        raise FilterError(f"{where}: a filter may nest at most {MAX_DEPTH} levels deep.")
    if key.startswith("$"):
        if key in ("$and", "$or"):
            items = _list_of_objects(value, where)
            parts = [_object(item, f"{where}[{i}]", depth + 1, counter)
                     for i, item in enumerate(items)]
            return "(" + (" && " if key == "$and" else " || ").join(parts) + ")"
        if key == "$not":
            if not isinstance(value, Mapping) or not value:
                raise FilterError(f"{where}: $not takes a non-empty object, got {_kind(value)}.")
            return "!(" + _object(value, where, depth + 1, counter) + ")"
        raise FilterError(
            f"{where}: {key} is not an operator here; use a field name, or one of "
            f"{', '.join(_LOGICAL)} (and {', '.join(_FIELD_OPS)} inside a field).")
    _check_key(key, where)
    target = "$." + json.dumps(key)
    if not isinstance(value, Mapping) or not any(str(k).startswith("$") for k in value):
        if isinstance(value, (Mapping, list)):
            raise FilterError(
                f"{where}: a list or object value matches by containment only at the top level "
                "of a filter; use $in to match one of several values.")
        counter.add(where)
        return f"{target} == {_literal(value, where)}"
    if not all(str(k).startswith("$") for k in value):
        raise FilterError(f"{where}: mixes operators and field names; put each field in a "
                          "term of its own.")
    return " && ".join(_operator(target, op, arg, f"{where}.{op}", counter)
                       for op, arg in value.items())


def _object(spec: Any, where: str, depth: int, counter: _Counter) -> str:
    if not isinstance(spec, Mapping) or not spec:
        raise FilterError(f"{where}: must be a non-empty object, got {_kind(spec)}.")
    parts = [_clause(k, v, f"{where}.{k}", depth, counter) for k, v in spec.items()]
    return parts[0] if len(parts) == 1 else "(" + " && ".join(parts) + ")"


def _operator(target: str, op: str, arg: Any, where: str, counter: _Counter) -> str:
    counter.add(where)
    if op == "$eq":
        if isinstance(arg, (Mapping, list)):
            raise FilterError(f"{where}: a list or object value matches by containment only at "
                              "the top level of a filter; use $in to match one of several "
                              "values.")
        return f"{target} == {_literal(arg, where)}"
    if op == "$ne":
        # exists(... ? ...) is false, not unknown, for a missing field or another type.
        return f"!exists({target} ? (@ == {_literal(arg, where)}))"
    if op in ("$in", "$nin"):
        if not isinstance(arg, list) or not arg:
            raise FilterError(f"{where}: takes a non-empty list of values, got {_kind(arg)}.")
        if len(arg) > MAX_LIST:
            raise FilterError(f"{where}: takes at most {MAX_LIST} values, got {len(arg)}.")
        anyof = " || ".join(f"@ == {_literal(v, f'{where}[{i}]')}" for i, v in enumerate(arg))
        found = f"exists({target} ? ({anyof}))"
        return found if op == "$in" else f"!{found}"
    if op in _COMPARE:
        if isinstance(arg, bool) or not isinstance(arg, (int, float, str)):
            raise FilterError(f"{where}: compares with a number or a string, got {_kind(arg)}.")
        return f"exists({target} ? (@ {_COMPARE[op]} {_literal(arg, where)}))"
    if op == "$exists":
        if not isinstance(arg, bool):
            raise FilterError(f"{where}: takes true or false, got {_kind(arg)}.")
        return f"exists({target})" if arg else f"!exists({target})"
    raise FilterError(f"{where}: unknown operator; the field operators are "
                      f"{', '.join(_FIELD_OPS)}.")


def _literal(value: Any, where: str) -> str:
    """A JSON scalar as a jsonpath literal (json.dumps escapes strings as jsonpath reads them)."""
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"{where}: {value} is not a JSON number.")
        return json.dumps(value)
    raise FilterError(f"{where}: expects a string, number, boolean or null, got {_kind(value)}.")


def _check_containable(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise FilterError(f"{where}: a filter may nest at most {MAX_DEPTH} levels deep.")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if str(k).startswith("$"):
                raise FilterError(f"{where}.{k}: operators apply to top-level metadata fields "
                                  "only.")
            _check_containable(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_containable(v, f"{where}[{i}]", depth + 1)
    else:
        _literal(value, where)


def _check_key(key: str, where: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS:
        raise FilterError(f"{where}: a field name must have 1 to {MAX_KEY_CHARS} characters.")


def _list_of_objects(value: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not value:
        raise FilterError(f"{where}: takes a non-empty list of objects, got {_kind(value)}.")
    if len(value) > MAX_LIST:
        raise FilterError(f"{where}: takes at most {MAX_LIST} items, got {len(value)}.")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not item:
            raise FilterError(f"{where}[{i}]: must be a non-empty object, got {_kind(item)}.")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an empty object" if not value else "an object"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__
