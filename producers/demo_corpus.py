"""Write a demo corpus built from the Python standard library's own docstrings, one file a module.

The corpus is generated on the machine that runs it, so the repository holds no copied text. Each
module becomes ``<module>.md``: a ``# <module>`` title, the module's docstring, then a ``## name``
section for each documented public class and function. Output is sorted and deterministic for a
given Python version and platform.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import sys
import warnings
from pathlib import Path
from types import ModuleType

__all__ = ["SKIPPED_MODULES", "module_markdown", "write_demo_corpus"]

# Modules that act on import (this prints, antigravity opens a browser), need a display or a
# terminal (tkinter, turtle, idlelib, curses, readline), exist on one platform only, or come
# from outside the standard library in a virtualenv (distutils is replaced by setuptools).
SKIPPED_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "curses", "readline",
    "rlcompleter", "msilib", "msvcrt", "nt", "winreg", "winsound", "posix", "pwd", "grp",
    "spwd", "nis", "crypt", "fcntl", "termios", "tty", "pty", "resource", "syslog",
    "ossaudiodev", "distutils", "ensurepip", "pydoc_data", "test",
})  # fmt: skip


def _import_quietly(name: str) -> ModuleType | None:
    """Import a module with its output and warnings suppressed; None when it cannot be."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        # Deprecated modules warn on import; their docstrings are still good text.
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # missing C extension, platform check, exit on import
            return None


def _doc(obj: object) -> str:
    # The object's own __doc__ only: inspect.getdoc would repeat a base class's docstring.
    raw = getattr(obj, "__doc__", None)
    return inspect.cleandoc(raw) if isinstance(raw, str) else ""


def _public_members(module: ModuleType) -> list[tuple[str, object]]:
    """Documented public classes and functions: those in ``__all__``, else those defined here."""
    declared = getattr(module, "__all__", None)
    names = sorted(
        {str(n) for n in declared}
        if isinstance(declared, (list, tuple))
        else {n for n in vars(module) if not n.startswith("_")}
    )
    members: list[tuple[str, object]] = []
    for name in names:
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if declared is None and getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere, documented there
        if _doc(obj):
            members.append((name, obj))
    return members


def module_markdown(module: ModuleType) -> str | None:
    """The markdown document of one module, or None when the module has no docstring."""
    doc = _doc(module)
    if not doc:
        return None
    parts = [f"# {module.__name__}", doc]
    for name, obj in _public_members(module):
        parts += [f"## {name}", _doc(obj)]
    return "\n\n".join(parts) + "\n"


def write_demo_corpus(out_dir: Path, limit: int | None = None) -> int:
    """Write ``<module>.md`` for each documented standard-library module; return how many.

    ``limit`` stops after that many files (in sorted module order).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in sorted(sys.stdlib_module_names):
        if limit is not None and written >= limit:
            break
        if name.startswith("_") or name in SKIPPED_MODULES:
            continue
        module = _import_quietly(name)
        text = module_markdown(module) if module is not None else None
        if text is None:
            continue
        (out_dir / f"{name}.md").write_text(text, encoding="utf-8", newline="\n")
        written += 1
    return written
