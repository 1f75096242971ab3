"""Cut documents into chunks the embedding model reads whole, each with its exact source offsets.

Every splitter returns :class:`Span` values ``(text, char_start, char_end)``. For the character
and token splitters ``text == doc[char_start:char_end]`` (chunks are trimmed of surrounding
whitespace); the markdown splitter puts the section's heading path on a line before that text.
No span is empty or whitespace only.

Splitting is recursive: a piece that is too long is cut at blank lines, then line ends, then
sentence ends, then whitespace, and only as a last resort inside a word. The pieces are packed
back together up to the size, ending each chunk at the strongest boundary available (paragraph,
then sentence, then line, then word) while it is at least half full, and each chunk repeats about
``chunk_overlap`` of the previous one's end.

:class:`TokenSplitter` measures in the model's own tokens and guarantees that no chunk is longer
than the model reads (``max_seq_length`` minus its special tokens): every planned chunk is
tokenized again on its own and re-split if it does not fit, so the model never silently
truncates a chunk. Every chunk also fits the chunk contract's text length (MAX_CHUNK_CHARS).
"""

from __future__ import annotations

import bisect
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from vecpipe.messages import load_schema

__all__ = [
    "MAX_CHUNK_CHARS",
    "Chunker",
    "RecursiveCharacterSplitter",
    "Span",
    "TextSplitter",
    "TokenSplitter",
    "Tokenizer",
    "load_tokenizer",
    "max_seq_length_of",
    "strip_span",
]

# The longest chunk text that schemas/chunk.v1.json accepts.
MAX_CHUNK_CHARS: int = load_schema("chunk.v1.json")["properties"]["text"]["maxLength"]


class Span(NamedTuple):
    """A chunk's text and the character range ``[char_start, char_end)`` of its document."""

    text: str
    char_start: int
    char_end: int


class Chunker(Protocol):
    """Anything that cuts a text into spans; what :func:`chunk_document` needs."""

    def split(self, text: str) -> list[Span]:
        """Cut ``text`` into non-empty spans in document order."""
        ...


class Tokenizer(Protocol):
    """The part of a HuggingFace fast tokenizer that chunking uses."""

    model_max_length: int

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        """Tokenize one text or a batch; ``offset_mapping`` needs a fast tokenizer."""
        ...

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens ([CLS], [SEP], ...) the model input adds to a text."""
        ...


# measure(start, end): length of text[start:end] in the splitter's unit.
Measure = Callable[[int, int], int]
# hard_cut(start, end, limit): contiguous ranges covering [start, end), each of length <= limit.
HardCut = Callable[[int, int, int], list[tuple[int, int]]]

# Cut points, strongest first; each cut falls after the separator, so that the separator stays
# with the text before it and the pieces cover the text without gaps.
_SEPARATORS = (
    re.compile(r"\n[^\S\n]*\n(?:[^\S\n]*\n)*"),  # blank line(s): paragraph
    re.compile(r"\n"),  # line
    re.compile(r"[.!?…]['\")\]”’»]*\s+|[。！？]"),  # sentence
    re.compile(r"\s+"),  # word
)
_WORD_START = re.compile(r"\s+(?=\S)")
_TERMINALS = ".!?…。！？"
_CLOSERS = "'\")]”’»"
_FULL_WIDTH_TERMINALS = "。！？"
# Boundary strengths after a piece, strongest (preferred place to end a chunk) first.
_PARAGRAPH, _SENTENCE, _LINE, _WORD, _NONE = range(5)


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _boundary(text: str, start: int, end: int) -> int:
    """How good a place the end of ``text[start:end]`` is to end a chunk."""
    if end >= len(text):
        return _PARAGRAPH
    body_end = end
    while body_end > start and text[body_end - 1].isspace():
        body_end -= 1
    gap = text[body_end:end]
    if gap.count("\n") >= 2:
        return _PARAGRAPH
    k = body_end
    while k > start and text[k - 1] in _CLOSERS:
        k -= 1
    if k > start and text[k - 1] in _TERMINALS and (gap or text[k - 1] in _FULL_WIDTH_TERMINALS):
        return _SENTENCE
    if "\n" in gap:
        return _LINE
    return _WORD if gap else _NONE


def _pieces(
    text: str, start: int, end: int, level: int, limit: int, measure: Measure, hard_cut: HardCut
) -> list[tuple[int, int]]:
    """Contiguous ranges covering ``[start, end)``, each fitting ``limit``, cut at the strongest
    separator that makes them fit."""
    if measure(start, end) <= limit:
        return [(start, end)]
    if level == len(_SEPARATORS):
        return hard_cut(start, end, limit)
    cuts = [m.end() for m in _SEPARATORS[level].finditer(text, start, end) if m.end() < end]
    if not cuts:
        return _pieces(text, start, end, level + 1, limit, measure, hard_cut)
    out: list[tuple[int, int]] = []
    for a, b in zip([start, *cuts], [*cuts, end], strict=True):
        out.extend(_pieces(text, a, b, level + 1, limit, measure, hard_cut))
    return out


def _coalesce(pieces: list[tuple[int, int]], measure: Measure) -> list[tuple[int, int]]:
    """Join pieces that measure nothing (whitespace; for tokens, also characters the tokenizer
    drops) to a neighbour, so that every chunk boundary moves past real content."""
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        if out and (measure(a, b) == 0 or measure(*out[-1]) == 0):
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _merge(
    text: str, pieces: list[tuple[int, int]], limit: int, overlap: int, measure: Measure
) -> list[tuple[int, int]]:
    """Pack consecutive pieces into ranges of at most ``limit``, each repeating at most ``overlap``
    of the one before."""
    strength = [_boundary(text, a, b) for a, b in pieces]
    out: list[tuple[int, int]] = []
    n = len(pieces)
    # The current chunk begins at `start`: the start of piece i, or a word inside the piece
    # before it when the chunk opens with an overlap.
    start, i = pieces[0][0], 0
    last = -1  # the last piece of the previous chunk
    while True:
        j = i
        while j + 1 < n and measure(start, pieces[j + 1][1]) <= limit:
            j += 1
        if j == n - 1:
            out.append((start, pieces[j][1]))
            return out
        # End at the strongest boundary (the latest of equals) that leaves the chunk at least
        # half full: a chunk ending mid-paragraph embeds worse than a slightly shorter one.
        # It must end past the previous chunk, or the previous one would repeat inside it.
        best = j
        for c in range(j - 1, max(i, last + 1) - 1, -1):
            if measure(start, pieces[c][1]) < limit // 2:
                break
            if strength[c] < strength[best]:
                best = c
        out.append((start, pieces[best][1]))
        start, i = _overlap_start(text, pieces, i, start, best, overlap, limit, measure)
        last = best


def _overlap_start(
    text: str,
    pieces: list[tuple[int, int]],
    first: int,
    start: int,
    last: int,
    overlap: int,
    limit: int,
    measure: Measure,
) -> tuple[int, int]:
    """Where the chunk after ``[start, pieces[last] end)`` begins, and its first whole piece.

    It repeats the trailing whole pieces, then the trailing words of the piece before them, that
    measure at most ``overlap``, and leaves room for piece ``last + 1``, so that every chunk gains
    new text and chunking moves on.
    """
    end, following = pieces[last][1], pieces[last + 1][1]
    # Past the first character the current chunk keeps after trimming, or the next chunk
    # would contain it whole.
    floor = strip_span(text, start, end)[0]

    def fits(p: int) -> bool:
        return p > floor and measure(p, end) <= overlap and measure(p, following) <= limit

    k = last + 1
    while k - 1 >= first and fits(pieces[k - 1][0]):
        k -= 1
    if k - 1 >= first:
        a, b = pieces[k - 1]
        for m in _WORD_START.finditer(text, a, b):
            if fits(m.end()):
                return m.end(), k
    return pieces[k][0], k


def _drop_contained(spans: list[Span]) -> list[Span]:
    """Drop a span that lies inside its neighbour (a range split again in ``_fit`` can overlap
    the next chunk that far): its text is embedded with the neighbour anyway."""
    out: list[Span] = []
    for span in spans:
        if out and out[-1].char_start <= span.char_start and span.char_end <= out[-1].char_end:
            continue
        while out and span.char_start <= out[-1].char_start and out[-1].char_end <= span.char_end:
            out.pop()
        out.append(span)
    return out


class TextSplitter(ABC):
    """Recursive splitting with overlap, measured in the unit that a subclass defines."""

    def __init__(self, chunk_size: int, chunk_overlap: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        if not 0 <= chunk_overlap < chunk_size:
            raise ValueError(
                f"chunk_overlap must be at least 0 and smaller than chunk_size {chunk_size}, "
                f"got {chunk_overlap}."
            )
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap

    @property
    def max_length(self) -> int:
        """The most a chunk's text (prefix included) may measure."""
        return self.chunk_size

    @abstractmethod
    def length(self, text: str) -> int:
        """Length of ``text`` in this splitter's unit."""

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Lengths of many texts (a subclass may measure them in one batch)."""
        return [self.length(t) for t in texts]

    @abstractmethod
    def _index(self, text: str) -> tuple[Measure, HardCut]:
        """How to measure ranges of ``text`` and cut a range that has no separator left."""

    def split(self, text: str, prefix: str = "") -> list[Span]:
        """Cut ``text`` into spans whose ``prefix + text`` fits :attr:`max_length`.

        The span's text is ``prefix + text[char_start:char_end]``; with no prefix it is
        exactly the document's text at those offsets.
        """
        if not text.strip():
            return []
        reserve = self.length(prefix) if prefix else 0
        if reserve >= self.max_length:
            raise ValueError(
                f"the prefix {prefix[:60]!r} measures {reserve}, which leaves no room under "
                f"the chunk limit {self.max_length}; shorten it."
            )
        measure, hard_cut = self._index(text)
        spans = self._fit(text, 0, len(text), self.max_length - reserve, prefix, measure, hard_cut)
        return _drop_contained(spans)

    def _fit(
        self,
        text: str,
        start: int,
        end: int,
        budget: int,
        prefix: str,
        measure: Measure,
        hard_cut: HardCut,
    ) -> list[Span]:
        # The overlap is a share of the chunk: keep that share when the budget is smaller
        # (a prefix, or a chunk_size above what the model reads).
        overlap = min(round(self.chunk_overlap * budget / self.chunk_size), budget - 1)
        pieces = _coalesce(_pieces(text, start, end, 0, budget, measure, hard_cut), measure)
        merged = _merge(text, pieces, budget, overlap, measure)
        planned = [(a, b) for a, b in (strip_span(text, a, b) for a, b in merged) if a < b]
        texts = [prefix + text[a:b] for a, b in planned]
        reserve = self.length(prefix) if prefix else 0
        out: list[Span] = []
        for (a, b), chunk_text, size in zip(planned, texts, self.lengths(texts), strict=True):
            if size <= reserve:
                # Only characters the tokenizer drops: the model would embed an empty input.
                continue
            too_many_chars = len(chunk_text) > MAX_CHUNK_CHARS
            if size <= self.max_length and not too_many_chars:
                out.append(Span(chunk_text, a, b))
                continue
            # Measured on its own the chunk is longer than it was inside the document (a
            # tokenizer can depend on context): plan this range again with the excess removed.
            inner = measure(a, b)
            smaller = min(budget, inner) - (size - self.max_length)
            if not too_many_chars and smaller >= 1 and inner > 1:
                out.extend(self._fit(text, a, b, smaller, prefix, measure, hard_cut))
            elif b - a > 1:
                # Halving by characters always ends: also the way out for a chunk that is short
                # in tokens but too long for the wire contract (a huge word is one [UNK]).
                mid = (a + b) // 2
                out.extend(self._fit(text, a, mid, budget, prefix, measure, hard_cut))
                out.extend(self._fit(text, mid, b, budget, prefix, measure, hard_cut))
            else:
                raise ValueError(
                    f"the character {text[a:b]!r} at offset {a} alone measures {size}, more "
                    f"than the chunk limit {self.max_length}."
                )
        return out


class RecursiveCharacterSplitter(TextSplitter):
    """Chunks of at most ``chunk_size`` characters, overlapping by about ``chunk_overlap``.

    Knows nothing of the model: a chunk of 2000 characters may hold more tokens than the model
    reads, and the excess is silently dropped at embedding time (see :func:`truncation_report`).
    """

    def length(self, text: str) -> int:
        """Length of ``text`` in characters."""
        return len(text)

    def _index(self, text: str) -> tuple[Measure, HardCut]:
        def measure(start: int, end: int) -> int:
            # Chunks are trimmed, so whitespace at a range's ends does not count.
            return len(text[start:end].strip())

        def hard_cut(start: int, end: int, limit: int) -> list[tuple[int, int]]:
            return [(p, min(p + limit, end)) for p in range(start, end, limit)]

        return measure, hard_cut


class TokenSplitter(TextSplitter):
    """Chunks of at most ``min(chunk_size, max_seq_length - special tokens)`` model tokens.

    ``tokenizer`` is a HuggingFace fast tokenizer (``offset_mapping`` gives exact offsets);
    ``max_seq_length`` is what the model reads, special tokens included (defaults to the
    tokenizer's ``model_max_length``; prefer :meth:`from_model`, which reads the model's own).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chunk_size: int,
        chunk_overlap: int,
        *,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__(chunk_size, chunk_overlap)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length or _sane_max_length(tokenizer)
        self.special_tokens = int(tokenizer.num_special_tokens_to_add(pair=False))
        if self.max_seq_length - self.special_tokens < 1:
            raise ValueError(
                f"max_seq_length {self.max_seq_length} leaves no room next to the model's "
                f"{self.special_tokens} special tokens."
            )

    @classmethod
    def from_model(
        cls, model_path_or_name: str, chunk_size: int, chunk_overlap: int
    ) -> TokenSplitter:
        """A splitter for a sentence-transformers model, loading only its tokenizer and config."""
        tokenizer = load_tokenizer(model_path_or_name)
        return cls(
            tokenizer,
            chunk_size,
            chunk_overlap,
            max_seq_length=max_seq_length_of(model_path_or_name, tokenizer),
        )

    @property
    def max_length(self) -> int:
        """The most tokens a chunk's text may have, special tokens not counted."""
        return min(self.chunk_size, self.max_seq_length - self.special_tokens)

    def length(self, text: str) -> int:
        """Number of model tokens in ``text``, special tokens not counted."""
        return self.lengths([text])[0]

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Numbers of model tokens in each of ``texts``, in one batch."""
        if not texts:
            return []
        # verbose=False: long inputs are expected here; the warning about them is not.
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def _index(self, text: str) -> tuple[Measure, HardCut]:
        # Tokenize the document once; a range's length is the number of tokens starting in it.
        # Cuts fall on whitespace or token starts, so this is what the range gets on its own
        # for WordPiece-like tokenizers, and _fit re-checks every chunk for any other.
        enc = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        starts = sorted(int(s) for s, _ in enc["offset_mapping"])

        def measure(start: int, end: int) -> int:
            return bisect.bisect_left(starts, end) - bisect.bisect_left(starts, start)

        def hard_cut(start: int, end: int, limit: int) -> list[tuple[int, int]]:
            lo, hi = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
            cuts = [starts[k] for k in range(lo + limit, hi, limit) if start < starts[k] < end]
            return list(zip([start, *cuts], [*cuts, end], strict=True))

        return measure, hard_cut


def _sane_max_length(tokenizer: Tokenizer) -> int:
    # Tokenizers without a known limit report a huge sentinel (int(1e30)); BERT-sized models
    # read 512 tokens.
    value = int(getattr(tokenizer, "model_max_length", 512) or 512)
    return value if value < 100_000 else 512


@cache
def load_tokenizer(model_path_or_name: str) -> Tokenizer:
    """Load (once per process) only the tokenizer of a model folder or hub name, never weights."""
    from transformers import AutoTokenizer

    tokenizer: Tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call,unused-ignore]
        model_path_or_name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the tokenizer of {model_path_or_name!r} is not a fast tokenizer; token chunking "
            "needs its offsets (install `tokenizers` or pick another model)."
        )
    return tokenizer


def max_seq_length_of(model_path_or_name: str, tokenizer: Tokenizer | None = None) -> int:
    """How many tokens the model reads, from its ``sentence_bert_config.json``.

    Falls back to a cached copy of that file for a hub name, then to the tokenizer's limit.
    """
    config = Path(model_path_or_name) / "sentence_bert_config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path_or_name, "sentence_bert_config.json")
        except Exception:  # a name that is no repository id: nothing cached for it
            cached = None
        config = Path(cached) if isinstance(cached, str) else config
    if config.is_file():
        value = json.loads(config.read_text("utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return _sane_max_length(tokenizer or load_tokenizer(model_path_or_name))


# ATX headings only; a heading needs a space after its hashes ("#tag" is text).
