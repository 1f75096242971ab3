"""Passwords masked in URLs, connection strings and text, for messages and logs.

A small parser of our own (a leaf: it imports nothing of vecpipe and no client library), so that
configuration errors can name a URL while ``vecpipe --help`` still loads no driver.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_text", "redact_url"]


_PASSWORD_PAIR = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)")
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://\S+")


def redact_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs: a URL's ``user:password@`` (the
    password may hold ``@`` or ``:``), its query string's ``password=``, and the ``password=`` of
    a key=value connection string. A small parser of our own, so that no client library loads."""
    masked = _PASSWORD_PAIR.sub(r"\1***", url)
    try:
        parts = urlsplit(masked)
    except ValueError:
        return masked
    if parts.password is None:
        return masked
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redact_text(text: str) -> str:
    """``text`` (a log line, an error message) with the password of every URL or connection
    string in it masked."""
    return _PASSWORD_PAIR.sub(r"\1***", _URL.sub(lambda m: redact_url(m.group(0)), text))
