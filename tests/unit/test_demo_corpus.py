"""Demo corpus: standard-library docstrings as markdown, deterministic, argparse included."""

from __future__ import annotations

from pathlib import Path

from producers.demo_corpus import SKIPPED_MODULES, write_demo_corpus


def test_writes_argparse_with_its_classes(tmp_path: Path) -> None:
    """argparse.md has the title, the module docstring about command-line parsing, and classes."""
    count = write_demo_corpus(tmp_path)
    assert count == len(list(tmp_path.glob("*.md"))) > 100
    text = (tmp_path / "argparse.md").read_text("utf-8")
    assert text.startswith("# argparse\n\nCommand-line parsing library")
    assert "\n## ArgumentParser\n\n" in text
    assert "parse" in text.lower() and "arguments" in text.lower()


def test_skips_modules_that_act_on_import_or_lack_docstrings(tmp_path: Path) -> None:
    """Modules that print, open windows or have no docstring get no file."""
    write_demo_corpus(tmp_path)
    names = {p.stem for p in tmp_path.glob("*.md")}
    assert not names & SKIPPED_MODULES
    assert "this" not in names and "antigravity" not in names and "tkinter" not in names
    assert "concurrent" not in names  # a package without a docstring
    assert not any(n.startswith("_") for n in names)


def test_deterministic_and_limited(tmp_path: Path) -> None:
    """Two runs write identical files; limit writes the first modules in sorted order."""
    first, second, few = tmp_path / "1", tmp_path / "2", tmp_path / "few"
    write_demo_corpus(first)
    write_demo_corpus(second)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert write_demo_corpus(few, limit=3) == 3
    assert sorted(p.name for p in few.iterdir()) == files[:3]
