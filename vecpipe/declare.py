"""Declaring a configuration setting: its default, its checks and its short variable name.

:mod:`vecpipe.config` declares every section's fields with :func:`setting`; each check gets the
value and its whole section and returns what is wrong, as the end of a sentence that names the
setting ("must be at least 1, got 0."), or None.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any

from vecpipe.errors import ConfigError

__all__ = ["Check", "at_least", "at_most", "coerce", "matching", "not_blank", "one_of", "optional",
           "setting"]


# A check gets the value and its whole section (for limits that depend on another setting) and
# returns what is wrong ("must be at least 1, got 0."), or None.
Check = Callable[[Any, Any], str | None]


def setting(default: Any = MISSING, *checks: Check, env: str | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A configuration field: its default (or ``factory``), its checks and its short variable."""
    metadata = {"checks": checks, "env": env}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(minimum: float | Callable[[Any], float]) -> Check:
    """The value is at least ``minimum`` (a number, or one computed from the section)."""
    def check(value: Any, section: Any) -> str | None:
        low = minimum(section) if callable(minimum) else minimum
        return None if value >= low else f"must be at least {low}, got {value!r}."
    return check


def at_most(maximum: float) -> Check:
    """The value is at most ``maximum``."""
    def check(value: Any, section: Any) -> str | None:
        return None if value <= maximum else f"must be at most {maximum:g}, got {value}."
    return check


def one_of(allowed: tuple[str, ...], *, any_case: bool = False) -> Check:
    """The value is one of ``allowed`` (in any letter case, with ``any_case``)."""
    def check(value: Any, section: Any) -> str | None:
        if (str(value).lower() if any_case else value) in allowed:
            return None
        return f"must be one of {', '.join(allowed)}, got {value!r}."
    return check


def matching(pattern: str, what: str) -> Check:
    """The value matches ``pattern``; ``what`` says in words what that means."""
    compiled = re.compile(pattern)

    def check(value: Any, section: Any) -> str | None:
        return None if compiled.match(str(value)) else f"{value!r} {what}."
    return check


def not_blank(what: str) -> Check:
    """The value is not empty; ``what`` says what to give instead."""
    def check(value: Any, section: Any) -> str | None:
        return None if str(value).strip() else f"is empty; {what}."
    return check


def optional(check: Check) -> Check:
    """``check``, unless the value is empty (the setting is not used)."""
    def optional(value: Any, section: Any) -> str | None:
        return check(value, section) if str(value) else None
    return optional


def coerce(setting_name: str, raw: Any, kind: type[Any]) -> Any:
    """Turn a raw value (string from the environment, or TOML value) into ``kind``."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(str(raw).strip().replace("_", ""))
        if kind is float:
            return float(str(raw).strip())
        return str(raw)
    except ValueError:
        raise ConfigError(
            f"{setting_name} must be {'a whole number' if kind is int else kind.__name__}, "
            f"got {raw!r}."
        ) from None
