"""Isolate the record that makes a batch fail, by halving the batch, so that it fails alone.

Used by the embed stage (a text the model refuses, or a batch too big for the device) and by the
writer (a row the database refuses). Halves keep the batch's order, so what succeeds is what one
call over the good records would have done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["isolate"]

T = TypeVar("T")
R = TypeVar("R")


def isolate(
    items: Sequence[T],
    run: Callable[[Sequence[T]], R],
    *,
    poison: Callable[[BaseException], bool],
    on_poison: Callable[[T, BaseException], None],
    on_split: Callable[[Sequence[T], BaseException], None] | None = None,
) -> list[R]:
    """``run(items)``; when it raises an error that ``poison`` accepts, run each half instead,
    down to single items, and hand a single item that still fails to ``on_poison``.

    Returns the results of the calls that succeeded, in order. An error that ``poison`` does
    not accept propagates at once: the batch fails as a whole (an outage, a bug).
    """
    if not items:
        return []
    try:
        return [run(items)]
    except Exception as exc:
        if not poison(exc):
            raise
        if len(items) == 1:
            on_poison(items[0], exc)
            return []
        if on_split is not None:
            on_split(items, exc)
    half = len(items) // 2
    return [*isolate(items[:half], run, poison=poison, on_poison=on_poison, on_split=on_split),
            *isolate(items[half:], run, poison=poison, on_poison=on_poison, on_split=on_split)]
