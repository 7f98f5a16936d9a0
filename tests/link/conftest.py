"""Fixtures for the IP-less link tests: a whole link stack per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ._support import LinkStack, StackFactory


@pytest.fixture(scope="module")
async def make_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StackFactory]:
    """``await make_stack(bridge_mode=..., heartbeat=..., down_grace=...)``: a started
    broker + rpc-router + serial-bridge + (empty) lab fleet, closed after the module."""
    created: list[LinkStack] = []

    async def make(**options: Any) -> LinkStack:
        stack = LinkStack(tmp_path_factory.mktemp("link"), **options)
        created.append(stack)
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in reversed(created):
            await stack.close()
