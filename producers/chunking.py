"""Chunkers by name, the markdown splitter, and documents cut into chunk messages.

The character and token splitters live in :mod:`producers.splitters` (re-exported here); the
markdown splitter wraps one of them and puts each section's heading path on a line before its
text. :func:`chunk_document` turns a document into the chunks the pipeline publishes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from producers.splitters import (
    MAX_CHUNK_CHARS,
    Chunker,
    RecursiveCharacterSplitter,
    Span,
    TextSplitter,
    Tokenizer,
    TokenSplitter,
    load_tokenizer,
    max_seq_length_of,
    strip_span,
)
from vecpipe.config import CHUNKERS, default_model_path
from vecpipe.messages import Chunk, Document, content_hash

__all__ = [
    "MAX_CHUNK_CHARS",
    "Chunker",
    "MarkdownSplitter",
    "RecursiveCharacterSplitter",
    "Span",
    "TextSplitter",
    "TokenSplitter",
    "Tokenizer",
    "chunk_document",
    "compare_on_corpus",
    "load_tokenizer",
    "make_chunker",
    "max_seq_length_of",
    "truncation_report",
]

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*\n?")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_PATH_SEPARATOR = " > "
# A longer heading path is no label (and one huge word in it is a single [UNK] token).
_MAX_PREFIX_CHARS = 1000


@dataclass(frozen=True)
class _Section:
    level: int  # 0 for the text before the first heading
    path: tuple[str, ...]
    heading_start: int
    body_start: int
    body_end: int


def _sections(text: str) -> list[_Section]:
    """Split markdown at ATX headings outside fenced code blocks."""
    sections: list[_Section] = []
    stack: list[tuple[int, str]] = []
    level, heading_start, body_start = 0, 0, 0
    fence: str | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        line_start, pos = pos, pos + len(line)
        fence_match = _FENCE.match(line)
        if fence is not None:
            # A fence closes with the same character, at least as long, and nothing after it.
            if fence_match and fence_match.group(1).startswith(fence) and not line[
                fence_match.end() :
            ].strip():
                fence = None
            continue
        if fence_match:
            fence = fence_match.group(1)
            continue
        heading = _HEADING.fullmatch(line)
        if heading is None:
            continue
        sections.append(
            _Section(level, tuple(t for _, t in stack), heading_start, body_start, line_start)
        )
        level = len(heading.group(1))
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, (heading.group(2) or "").strip()))
        heading_start, body_start = line_start, pos
    sections.append(
        _Section(level, tuple(t for _, t in stack), heading_start, body_start, len(text))
    )
    return sections


class MarkdownSplitter:
    """Splits markdown by headings, prefixing each chunk with its heading path.

    Each section's chunks start with a line such as ``Install > Linux`` (the headings above it),
    then a blank line, then the section's text at ``[char_start, char_end)``. Long sections are
    cut by ``inner``, which still guarantees its limit for the text including that line. A
    heading with nothing under it and no sub-section becomes a chunk of its heading path alone.
    """

    def __init__(self, inner: TextSplitter) -> None:
        self.inner = inner

    def _prefix(self, path: tuple[str, ...]) -> str:
        # A heading path longer than half a chunk would crowd out the text it labels: fall back
        # to the nearest heading, then to none (the heading line then stays in the text).
        titles = [t for t in path if t]
        for candidate in (titles, titles[-1:]):
            if candidate:
                line = _PATH_SEPARATOR.join(candidate)
                if (
                    len(line) <= _MAX_PREFIX_CHARS
                    and self.inner.length(line) <= self.inner.max_length // 2
                ):
                    return line
        return ""

    def split(self, text: str) -> list[Span]:
        """Cut markdown ``text`` into heading-prefixed spans, section by section."""
        out: list[Span] = []
        sections = _sections(text)
        for i, section in enumerate(sections):
            prefix = self._prefix(section.path) if section.level else ""
            start = section.body_start if prefix or not section.level else section.heading_start
            body = text[start : section.body_end]
            if not body.strip():
                has_child = i + 1 < len(sections) and sections[i + 1].level > section.level
                if section.level and not has_child:
                    out.extend(self._heading_only(text, section, prefix))
                continue
            head = prefix + "\n\n" if prefix else ""
            out.extend(
                Span(s.text, s.char_start + start, s.char_end + start)
                for s in self.inner.split(body, head)
            )
        return out

    def _heading_only(self, text: str, section: _Section, prefix: str) -> list[Span]:
        a, b = strip_span(text, section.heading_start, section.body_start)
        if prefix and self.inner.length(prefix) <= self.inner.max_length:
            return [Span(prefix, a, b)] if prefix.strip() else []
        return [
            Span(s.text, s.char_start + a, s.char_end + a) for s in self.inner.split(text[a:b])
        ]


def make_chunker(kind: str, model: str, chunk_size: int, chunk_overlap: int) -> Chunker:
    """Build the chunker a producer uses (``produce.chunker``; see :data:`CHUNKERS`).

    ``chunk_size`` is in characters for "recursive" and in model tokens for "token" and
    "markdown", which load only ``model``'s tokenizer.
    """
    if kind == "recursive":
        return RecursiveCharacterSplitter(chunk_size, chunk_overlap)
    if kind == "token":
        return TokenSplitter.from_model(model, chunk_size, chunk_overlap)
    if kind == "markdown":
        return MarkdownSplitter(TokenSplitter.from_model(model, chunk_size, chunk_overlap))
    raise ValueError(f"unknown chunker {kind!r}; use one of {', '.join(CHUNKERS)}.")


def chunk_document(doc: Document, chunker: Chunker) -> list[Chunk]:
    """The chunks of one document version, indexed 0..n-1; none when its content is blank."""
    spans = chunker.split(doc.content)
    return [
        Chunk(
            tenant_id=doc.tenant_id,
            doc_id=doc.doc_id,
            version=doc.version,
            chunk_index=index,
            chunk_count=len(spans),
            text=span.text,
            content_hash=content_hash(span.text),
            char_start=span.char_start,
            char_end=span.char_end,
            source_uri=doc.source_uri,
            metadata=dict(doc.metadata),
        )
        for index, span in enumerate(spans)
    ]


def truncation_report(
    texts: Iterable[str], tokenizer: Tokenizer, max_seq_length: int
) -> dict[str, int]:
    """Count what the model would silently cut off: chunks and tokens past ``max_seq_length``.

    Tokens include the model's special tokens, as in the model's input. Keys: ``chunks``,
    ``tokens``, ``max_tokens``, ``truncated_chunks``, ``tokens_lost``.
    """
    batch = list(texts)
    ids = tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"] if batch else []
    counts = [len(x) for x in ids]
    return {
        "chunks": len(counts),
        "tokens": sum(counts),
        "max_tokens": max(counts, default=0),
        "truncated_chunks": sum(1 for n in counts if n > max_seq_length),
        "tokens_lost": sum(n - max_seq_length for n in counts if n > max_seq_length),
    }


def compare_on_corpus(
    corpus_dir: Path,
    model: str | None = None,
    *,
    char_size: int = 2000,
    char_overlap: int = 200,
    token_size: int = 256,
    token_overlap: int = 32,
) -> dict[str, dict[str, int]]:
    """Truncation reports of the character, token and markdown chunkers on ``corpus_dir/*.md``.

    ``model`` defaults to the bundled all-MiniLM-L6-v2 (see :func:`write_demo_corpus` in
    ``producers.demo_corpus`` for a corpus).
    """
    model = model or default_model_path()
    texts = [p.read_text("utf-8") for p in sorted(corpus_dir.glob("*.md"))]
    tokenizer = load_tokenizer(model)
    limit = max_seq_length_of(model, tokenizer)
    chunkers: dict[str, Chunker] = {
        f"recursive-{char_size}-chars": RecursiveCharacterSplitter(char_size, char_overlap),
        f"token-{token_size}": make_chunker("token", model, token_size, token_overlap),
        f"markdown-{token_size}": make_chunker("markdown", model, token_size, token_overlap),
    }
    return {
        name: truncation_report(
            (span.text for text in texts for span in chunker.split(text)), tokenizer, limit
        )
        for name, chunker in chunkers.items()
    }
