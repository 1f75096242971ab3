"""Finds the folders shipped beside the code: ``schemas/`` and ``sql/``.

In a wheel they are installed as ``vecpipe.schemas`` and ``vecpipe.sql``; in a source checkout
(editable install, tests) they are the top-level folders of the repository.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["resource_dir"]


def resource_dir(name: str) -> Traversable:
    """The shipped folder ``name`` ("schemas" or "sql"), wherever this install keeps it."""
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    return resources.files(f"vecpipe.{name}")
