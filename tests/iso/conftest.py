"""Fixtures for the ISO builder: ``wheelhouse``, the agent's offline wheelhouse.

Built once and cached across test sessions (a cold build downloads ~21 MB with pip; later
sessions verify the cached copy in well under a second). The cache is
``$GUESTBUS_TEST_CACHE/wheelhouse``, default ``~/.cache/guestbus-tests/wheelhouse``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestbus_iso_builder.wheelhouse import Wheelhouse, ensure_wheelhouse, prune_wheelhouses


def wheelhouse_cache_dir() -> Path:
    root = Path(os.environ.get("GUESTBUS_TEST_CACHE", "~/.cache/guestbus-tests")).expanduser()
    return root / "wheelhouse"


@pytest.fixture(scope="session")
def wheelhouse() -> Wheelhouse:
    """The verified wheelhouse for the agent in this checkout (built on first use); older
    ones in the cache (other agent versions) are pruned after a day."""
    house = ensure_wheelhouse(wheelhouse_cache_dir())
    prune_wheelhouses(wheelhouse_cache_dir(), house, min_age=86400)
    return house
