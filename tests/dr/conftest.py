"""Fixtures for the DR tests: one DR stack per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._support import DrStack


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DrStack]:
    """Broker, rpc-router, serial-bridge, a lab fleet of DR-capable in-process agents and one
    in-process dr-orchestrator (``dr-a``)."""
    dr = DrStack(tmp_path_factory.mktemp("dr"))
    try:
        await dr.start()
        await dr.orchestrator("dr-a")
        yield dr
    finally:
        await dr.close()
