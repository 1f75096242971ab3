"""Turn files, directories and JSONL on stdin into :class:`~vecpipe.messages.Document` values.

Reading never stops at a bad input: each file or line that cannot be read is yielded as a
:class:`ReadFailure` naming it, with a one-sentence reason, and reading goes on.

Formats by extension: ``.txt``, ``.md``/``.markdown`` and ``.rst`` as UTF-8 text, ``.html``/``.htm``
as the page's visible text, ``.pdf`` as the pages' text, ``.jsonl`` as one document per line
(``schemas/document.v1.json``). In directories, files with other extensions are skipped and
counted in :class:`ReadStats`; a file named directly must have a known extension.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from vecpipe.errors import InvalidMessage
from vecpipe.messages import Document

__all__ = [
    "FORMATS",
    "STDIN",
    "ReadFailure",
    "ReadStats",
    "iter_documents",
    "read_file",
]

STDIN = "-"
# Extension -> format name (also recorded as metadata "format").
FORMATS: dict[str, str] = {
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".jsonl": "jsonl",
}
# Elements whose text is not the page's content.
_DROPPED_TAGS = ["script", "style", "nav", "noscript", "template", "head"]
# Elements that start a new paragraph in the page's text, and those that start a new line.
_BLOCK_TAGS = [
    "address", "article", "aside", "blockquote", "div", "dl", "figcaption", "figure", "footer",
    "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "ol", "p", "pre",
    "section", "table", "ul",
]  # fmt: skip
_LINE_TAGS = ["li", "dt", "dd", "tr"]
_CELL_TAGS = ["td", "th"]
# Private-use characters mark block and line breaks while the HTML's own whitespace is folded.
_PARA, _LINE = "\ue000", "\ue001"
_SPACE = re.compile(r"[^\S\ue000\ue001]+")
_JSON_TYPES: dict[type[Any], str] = {
    list: "array", str: "string", int: "number", float: "number", bool: "boolean",
    type(None): "null",
}  # fmt: skip


@dataclass(frozen=True)
class ReadFailure:
    """An input that could not be turned into a document: which one (file or file:line), and why."""

    source: str
    reason: str


@dataclass
class ReadStats:
    """What a reading run saw, for the summary a CLI prints at the end."""

    documents: int = 0
    failures: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        """Files skipped for an unknown extension."""
        return sum(self.skipped.values())


class _Unreadable(Exception):
    """One file cannot be read; the message is the ReadFailure's reason."""


def iter_documents(
    paths: Iterable[str | Path],
    tenant: str,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    *,
    stats: ReadStats | None = None,
    stdin: IO[bytes] | None = None,
) -> Iterator[Document | ReadFailure]:
    """Yield a document, or a failure, for every readable input under ``paths``, in order.

    A directory is walked recursively in sorted order, skipping hidden files and directories; a
    file in it is read when its path relative to the directory, or its name, matches one of
    ``include`` and none of ``exclude`` (``exclude`` also prunes directories). ``-`` reads JSONL
    from ``stdin`` (default: the process's standard input). Documents of JSONL input without a
    tenant get ``tenant``.
    """
    stats = stats if stats is not None else ReadStats()
    for raw in paths:
        if str(raw) == STDIN:
            stream = stdin if stdin is not None else sys.stdin.buffer
            items: Iterable[Document | ReadFailure] = _read_jsonl(stream, "<stdin>", tenant)
        else:
            items = _read_path(Path(raw), tenant, include, exclude, stats)
        for item in items:
            if isinstance(item, ReadFailure):
                stats.failures += 1
            else:
                stats.documents += 1
            yield item


def _read_path(
    path: Path,
    tenant: str,
    include: Sequence[str],
    exclude: Sequence[str],
    stats: ReadStats,
) -> Iterator[Document | ReadFailure]:
    if path.is_dir():
        for file, rel in _walk(path, include, exclude, stats):
            yield from read_file(file, tenant, doc_id=rel)
    elif path.is_file():
        if path.suffix.lower() not in FORMATS:
            # Named on purpose, so not skipped quietly.
            yield ReadFailure(
                str(path),
                f"{path.suffix or 'no extension'} is not a supported format; use one of "
                f"{', '.join(sorted(FORMATS))}.",
            )
            return
        yield from read_file(path, tenant, doc_id=path.name)
    elif path.exists():
        yield ReadFailure(str(path), "the path is neither a regular file nor a directory.")
    else:
        yield ReadFailure(str(path), "the path does not exist.")


def _matches(patterns: Sequence[str], rel: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _walk(
    root: Path, include: Sequence[str], exclude: Sequence[str], stats: ReadStats
) -> Iterator[tuple[Path, str]]:
    """Files under ``root`` to read, with their posix paths relative to it, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel_dir = base.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        # Pruning in place tells os.walk not to descend; sorting makes the order reproducible.
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not _matches(exclude, prefix + d, d)
        )
        for name in sorted(filenames):
            rel = prefix + name
            if name.startswith(".") or not _matches(include, rel, name):
                continue
            if _matches(exclude, rel, name):
                continue
            ext = Path(name).suffix.lower()
            if ext not in FORMATS:
                stats.skipped[ext or "(none)"] += 1
                continue
            yield base / name, rel


def read_file(path: Path, tenant: str, doc_id: str) -> Iterator[Document | ReadFailure]:
    """Read one file of a known format: one document (or failure), or one per JSONL line."""
    fmt = FORMATS[path.suffix.lower()]
    try:
        if fmt == "jsonl":
            with path.open("rb") as fh:
                yield from _read_jsonl(fh, str(path), tenant)
            return
        stat = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        yield ReadFailure(str(path), f"the file could not be read: {exc.strerror or exc}.")
        return
    metadata: dict[str, Any] = {"path": doc_id, "format": fmt}
    try:
        if fmt == "html":
            content, title = _html_text(_decode(data))
            if title:
                metadata["title"] = title
        elif fmt == "pdf":
            content, pages = _pdf_text(path)
            metadata["pages"] = pages
        else:
            content = _decode(data)
    except _Unreadable as exc:
        yield ReadFailure(str(path), str(exc))
        return
    yield Document(
        tenant_id=tenant,
        doc_id=doc_id,
        content=content,
        version=Document.version_from(datetime.fromtimestamp(stat.st_mtime, UTC)),
        source_uri=path.resolve().as_uri(),
        metadata=metadata,
    )


def _decode(data: bytes) -> str:
    """UTF-8 text (a byte order mark dropped) with line ends normalized to ``\\n``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unreadable(
            f"the file is not valid UTF-8 (byte {exc.start} is 0x{data[exc.start]:02x}); "
            "convert it to UTF-8."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _html_text(html: str) -> tuple[str, str]:
    """The visible text of a page, one blank line between blocks, and its title."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html.replace(_PARA, "").replace(_LINE, ""), "html.parser")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag is not None else ""
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()
    for pre in soup.find_all("pre"):
        # Code keeps its lines; elsewhere the source's line breaks are only spaces.
        pre.replace_with(_PARA + pre.get_text().replace("\n", _LINE) + _PARA)
    for br in soup.find_all("br"):
        br.replace_with(_LINE)
    for marker, tags in ((_PARA, _BLOCK_TAGS), (_LINE, _LINE_TAGS), (" ", _CELL_TAGS)):
        for tag in soup.find_all(tags):
            tag.insert_before(marker)
            tag.insert_after(marker)
    text = _SPACE.sub(" ", soup.get_text())
    paragraphs = (
        "\n".join(line.strip() for line in para.split(_LINE) if line.strip())
        for para in text.split(_PARA)
    )
    return "\n\n".join(p for p in paragraphs if p), title


def _pdf_text(path: Path) -> tuple[str, int]:
    """The text of every page, pages separated by a blank line, and the page count."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            # Viewers open a PDF that has only an owner password without asking; so do we.
            try:
                opened = bool(reader.decrypt(""))
            except Exception:  # e.g. AES without the optional crypto library
                opened = False
            if not opened:
                raise _Unreadable("the file is an encrypted PDF; give a copy without a password.")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except _Unreadable:
        raise
    except Exception as exc:
        # pypdf raises many exception types on damaged files; any of them means "unreadable".
        message = str(exc).rstrip(".") or "no details"
        raise _Unreadable(
            f"the file is not a readable PDF ({type(exc).__name__}: {message})."
        ) from None
    return "\n\n".join(p for p in pages if p), len(pages)


def _read_jsonl(stream: IO[bytes], source: str, tenant: str) -> Iterator[Document | ReadFailure]:
    """One document per non-blank line; a bad line is a failure naming ``source:line``."""
    for lineno, raw in enumerate(stream, start=1):
        where = f"{source}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield ReadFailure(where, f"the line is not valid UTF-8 (byte {exc.start}).")
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield ReadFailure(
                where, f"the line is not valid JSON: {exc.msg} at column {exc.colno}."
            )
            continue
        if not isinstance(data, dict):
            kind = _JSON_TYPES.get(type(data), type(data).__name__)
            yield ReadFailure(where, f"the line is a JSON {kind}, not a document object.")
            continue
        try:
            yield Document.from_dict(data, default_tenant=tenant)
        except InvalidMessage as exc:
            yield ReadFailure(where, str(exc))
        except ValueError:
            # The schema checks updated_at is a string; fromisoformat checks it is a date-time.
            yield ReadFailure(
                where,
                f"updated_at {data.get('updated_at')!r} is not an ISO 8601 date-time such as "
                "2024-05-01T12:00:00+00:00.",
            )
