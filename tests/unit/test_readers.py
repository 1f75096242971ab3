"""Readers: each format, failures reported without stopping, include/exclude globs, stdin."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pypdf

from producers.readers import ReadFailure, ReadStats, iter_documents
from vecpipe.messages import Document


def read_all(
    *paths: Path | str,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    stats: ReadStats | None = None,
    stdin: bytes = b"",
) -> tuple[list[Document], list[ReadFailure]]:
    docs: list[Document] = []
    failures: list[ReadFailure] = []
    for item in iter_documents(
        paths, "acme", include, exclude, stats=stats, stdin=io.BytesIO(stdin)
    ):
        if isinstance(item, ReadFailure):
            failures.append(item)
        else:
            docs.append(item)
    return docs, failures


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page, written byte by byte."""
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    font = 3 + 2 * n
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
    ]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def test_text_file_fields(tmp_path: Path) -> None:
    """A text file becomes a document keyed by its relative path, versioned by its mtime."""
    (tmp_path / "notes").mkdir()
    path = tmp_path / "notes" / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\r\nworld\n")
    os.utime(path, (1_700_000_000.25, 1_700_000_000.25))
    docs, failures = read_all(tmp_path)
    assert failures == []
    [doc] = docs
    assert doc.tenant_id == "acme"
    assert doc.doc_id == "notes/a.txt"
    assert doc.content == "hello\nworld\n"
    assert doc.version == 1_700_000_000_250_000
    assert doc.source_uri == path.resolve().as_uri()
    assert doc.source_uri.startswith("file:///")
    assert doc.metadata == {"path": "notes/a.txt", "format": "text"}


def test_single_file_is_keyed_by_its_name(tmp_path: Path) -> None:
    """A file named directly is keyed by its file name; md, markdown and rst are text."""
    for name in ("guide.md", "more.markdown", "ref.rst"):
        (tmp_path / name).write_text(f"# {name}\n\nbody\n", encoding="utf-8")
    docs, failures = read_all(*(tmp_path / n for n in ("guide.md", "more.markdown", "ref.rst")))
    assert failures == []
    assert [(d.doc_id, d.metadata["format"]) for d in docs] == [
        ("guide.md", "markdown"),
        ("more.markdown", "markdown"),
        ("ref.rst", "rst"),
    ]
    assert docs[0].content == "# guide.md\n\nbody\n"


def test_html_visible_text_and_title(tmp_path: Path) -> None:
    """HTML keeps visible text in paragraphs and lines, drops script/style/nav, keeps the title."""
    (tmp_path / "page.html").write_text(
        "<html><head><title> The  Page </title><style>p {color: red}</style></head><body>"
        "<nav>Home | About</nav><script>alert('x')</script><!-- a comment -->"
        "<h1>Heading</h1><p>First\n   paragraph with <b>bold</b> text.</p>"
        "<p>Second<br>line</p><ul><li>one</li><li>two</li></ul>"
        "<table><tr><th>key</th><th>value</th></tr><tr><td>dim</td><td>384</td></tr></table>"
        "<pre>code\n  indented</pre></body></html>",
        encoding="utf-8",
    )
    [doc], failures = read_all(tmp_path)
    assert failures == []
    assert doc.metadata == {"path": "page.html", "format": "html", "title": "The Page"}
    assert doc.content == (
        "Heading\n\nFirst paragraph with bold text.\n\nSecond\nline\n\none\ntwo\n\n"
        "key value\ndim 384\n\ncode\nindented"
    )


def test_pdf_pages_joined_with_blank_lines(tmp_path: Path) -> None:
    """A PDF's pages are extracted and joined with a blank line; the page count is recorded."""
    (tmp_path / "report.pdf").write_bytes(minimal_pdf(["First page text", "Second page text"]))
    [doc], failures = read_all(tmp_path)
    assert failures == []
    assert doc.content == "First page text\n\nSecond page text"
    assert doc.metadata == {"path": "report.pdf", "format": "pdf", "pages": 2}


def test_encrypted_and_broken_pdfs_are_failures(tmp_path: Path) -> None:
    """An encrypted PDF and a damaged one are each reported, and reading goes on."""
    writer = pypdf.PdfWriter()
    writer.add_blank_page(100, 100)
    writer.encrypt("secret", algorithm="RC4-128")
    with (tmp_path / "a-locked.pdf").open("wb") as fh:
        writer.write(fh)
    (tmp_path / "b-broken.pdf").write_bytes(b"%PDF-1.4\nnot really a PDF")
    (tmp_path / "c-fine.txt").write_text("still read", encoding="utf-8")
    docs, failures = read_all(tmp_path)
    assert [d.doc_id for d in docs] == ["c-fine.txt"]
    assert [Path(f.source).name for f in failures] == ["a-locked.pdf", "b-broken.pdf"]
    assert "encrypted PDF" in failures[0].reason
    assert "not a readable PDF" in failures[1].reason


def test_jsonl_bad_line_reported_rest_read(tmp_path: Path) -> None:
    """A bad JSONL line is a failure naming file and line; the other lines become documents."""
    lines = [
        json.dumps({"doc_id": "d1", "content": "one", "version": 1}),
        "{not json",
        "",
        json.dumps({"doc_id": "d2", "content": "two", "version": 2, "tenant_id": "other"}),
        json.dumps({"doc_id": "d3", "content": "three"}),
        json.dumps(["a", "list"]),
        json.dumps({"doc_id": "d4", "content": "four", "updated_at": "2024-05-01T00:00:00Z"}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, failures = read_all(path)
    assert [(d.tenant_id, d.doc_id, d.version) for d in docs] == [
        ("acme", "d1", 1),
        ("other", "d2", 2),
        ("acme", "d4", 1_714_521_600_000_000),
    ]
    assert [f.source for f in failures] == [f"{path}:2", f"{path}:5", f"{path}:6"]
    assert "not valid JSON" in failures[0].reason
    assert "neither version nor updated_at" in failures[1].reason
    assert "JSON array, not a document object" in failures[2].reason
    assert all(f.reason.endswith(".") for f in failures)


def test_undecodable_file_is_a_failure(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported with its path and the offending byte."""
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    docs, failures = read_all(tmp_path)
    assert docs == []
    assert failures == [
        ReadFailure(
            str(tmp_path / "latin1.txt"),
            "the file is not valid UTF-8 (byte 3 is 0xe9); convert it to UTF-8.",
        )
    ]


def test_include_exclude_hidden_and_unknown(tmp_path: Path) -> None:
    """Globs match the relative path or the name; hidden paths are skipped; unknown ones counted."""
    for rel in (
        "a.md",
        "b.txt",
        "docs/c.md",
        "docs/drafts/d.md",
        "build/e.md",
        ".git/f.md",
        "docs/.hidden.md",
        "img/logo.png",
        "Makefile",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("text", encoding="utf-8")
    stats = ReadStats()
    docs, failures = read_all(tmp_path, stats=stats)
    assert failures == []
    assert [d.doc_id for d in docs] == [
        "a.md",
        "b.txt",
        "build/e.md",
        "docs/c.md",
        "docs/drafts/d.md",
    ]
    assert stats.documents == 5
    assert stats.skipped == {".png": 1, "(none)": 1}
    docs, _ = read_all(tmp_path, include=("*.md",), exclude=("build", "docs/drafts/*"))
    assert [d.doc_id for d in docs] == ["a.md", "docs/c.md"]
    docs, _ = read_all(tmp_path, include=("docs/*",))
    assert [d.doc_id for d in docs] == ["docs/c.md", "docs/drafts/d.md"]


def test_missing_and_unsupported_paths_are_failures(tmp_path: Path) -> None:
    """A path that does not exist, or a file named directly in an unknown format, is reported."""
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    stats = ReadStats()
    docs, failures = read_all(tmp_path / "nope", tmp_path / "slides.pptx", stats=stats)
    assert docs == []
    assert [f.reason for f in failures] == [
        "the path does not exist.",
        ".pptx is not a supported format; use one of .htm, .html, .jsonl, .markdown, .md, .pdf, "
        ".rst, .txt.",
    ]
    assert stats.failures == 2


def test_stdin_jsonl(tmp_path: Path) -> None:
    """'-' reads JSONL documents from stdin; a bad line names <stdin> and its line number."""
    data = (
        json.dumps({"doc_id": "s1", "content": "from stdin", "version": 7}).encode()
        + b"\n\xff\xfe\n"
    )
    docs, failures = read_all("-", stdin=data)
    assert [(d.doc_id, d.content, d.version) for d in docs] == [("s1", "from stdin", 7)]
    assert [f.source for f in failures] == ["<stdin>:2"]
    assert "not valid UTF-8" in failures[0].reason
