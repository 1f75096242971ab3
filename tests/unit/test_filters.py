"""Metadata filters compile to a containment object and a jsonpath predicate, never SQL."""

from __future__ import annotations

import pytest

from vecpipe.db.filters import MAX_CLAUSES, FilterError, compile_filter


def test_no_filter_and_an_empty_one_keep_every_row() -> None:
    """None and {} compile to nothing at all."""
    assert compile_filter(None).empty
    assert compile_filter({}).empty


def test_scalar_equalities_become_path_equalities_the_gin_index_serves() -> None:
    """A scalar equality is a jsonpath ==, which also matches a list holding the value."""
    f = compile_filter({"lang": "en", "year": {"$eq": 2021}})
    assert f.contain == {}
    assert f.path == '$."lang" == "en" && $."year" == 2021'


def test_object_and_list_values_at_the_top_are_containment() -> None:
    """{"tags": [...]} keeps the old @> meaning: every listed tag is there."""
    f = compile_filter({"tags": ["a", "b"], "author": {"name": "x"}})
    assert f.contain == {"tags": ["a", "b"], "author": {"name": "x"}}
    assert f.path is None


def test_every_operator_compiles() -> None:
    """Each operator has its jsonpath form; negations match a missing field (Mongo's rule)."""
    cases = {
        '{"a": {"$ne": 1}}': '!exists($."a" ? (@ == 1))',
        '{"a": {"$in": ["x", "y"]}}': 'exists($."a" ? (@ == "x" || @ == "y"))',
        '{"a": {"$nin": [1]}}': '!exists($."a" ? (@ == 1))',
        '{"a": {"$gt": 1, "$lte": 5}}': 'exists($."a" ? (@ > 1)) && exists($."a" ? (@ <= 5))',
        '{"a": {"$exists": false}}': '!exists($."a")',
        '{"$or": [{"a": 1}, {"b": {"$lt": "m"}}]}': '($."a" == 1 || exists($."b" ? (@ < "m")))',
        '{"$not": {"a": true}}': '!($."a" == true)',
        '{"$and": [{"a": null}, {"b": 2.5}]}': '$."a" == null && $."b" == 2.5',
    }
    import json

    for spec, path in cases.items():
        assert compile_filter(json.loads(spec)).path == path, spec


def test_field_names_and_strings_are_quoted_so_nothing_escapes_the_literal() -> None:
    """Quotes and backslashes in names and values stay inside their jsonpath strings."""
    f = compile_filter({'we"ird\\': 'va"l) || true'})
    assert f.path == '$."we\\"ird\\\\" == "va\\"l) || true"'


@pytest.mark.parametrize(("spec", "names"), [
    ({"a": {"$foo": 1}}, "filter.a.$foo"),
    ({"a": {"$in": []}}, "filter.a.$in"),
    ({"a": {"$gt": True}}, "filter.a.$gt"),
    ({"a": {"$exists": "yes"}}, "filter.a.$exists"),
    ({"$or": {"a": 1}}, "filter.$or"),
    ({"$or": [{"a": [1]}]}, "filter.$or[0].a"),
    ({"$and": [{}]}, "filter.$and[0]"),
    ({"$where": "1"}, "filter.$where"),
    ({"a": {"$gt": 1, "b": 2}}, "filter.a"),
    ({"a": float("nan")}, "filter.a"),
    ({"$or": [{"a": {"$eq": [1]}}]}, "filter.$or[0].a.$eq"),
])
def test_a_wrong_filter_is_a_sentence_naming_the_wrong_part(spec: dict[str, object],
                                                            names: str) -> None:
    """Every refusal starts with the path of the part that is wrong."""
    with pytest.raises(FilterError) as err:
        compile_filter(spec)
    assert str(err.value).startswith(f"{names}: ")
    assert str(err.value).endswith(".")


def test_a_filter_that_is_not_an_object_is_refused() -> None:
    """A list or a string is not a filter."""
    with pytest.raises(FilterError, match="must be a JSON object"):
        compile_filter(["a"])  # type: ignore[arg-type]


def test_huge_filters_are_refused() -> None:
    """More conditions than MAX_CLAUSES is a 400, not a statement of unbounded cost."""
    with pytest.raises(FilterError, match="at most"):
        compile_filter({f"k{i}": i for i in range(MAX_CLAUSES + 1)})
    deep: dict[str, object] = {"a": 1}
    for _ in range(12):
        deep = {"$not": deep}
    with pytest.raises(FilterError, match="nest"):
        compile_filter(deep)
