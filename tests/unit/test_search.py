"""Unit tests of vecpipe.db.search that need no database: what a search refuses before it runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vecpipe.config import Config
from vecpipe.db.search import Searcher
from vecpipe.errors import SearchError


class NoPool:
    """A pool that must not be asked: the search is refused before it connects."""

    def connection(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the search connected")


@pytest.mark.parametrize("tenant", [None, ""])
def test_a_search_without_a_tenant_is_refused(tenant: str | None) -> None:
    """There is no default tenant: a search that forgot its tenant is an error, never a read of
    the configured default tenant's rows."""
    pool: Any = NoPool()
    query = np.ones(Config().vector.dimension, dtype=np.float32)
    with pytest.raises(SearchError, match="needs the tenant"):
        Searcher(Config(), pool).search(query, 5, tenant)
