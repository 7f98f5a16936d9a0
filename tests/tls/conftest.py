"""Fixtures for the certificate / mTLS fallback / clone tests: one stack per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ._support import TlsStack

StackFactory = Callable[..., Awaitable[TlsStack]]


@pytest.fixture(scope="module")
async def make_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StackFactory]:
    """``await make_stack(**TlsStack options)``: a started stack, closed after the module."""
    created: list[TlsStack] = []

    async def make(**options: Any) -> TlsStack:
        stack = TlsStack(tmp_path_factory.mktemp("tls"), **options)
        created.append(stack)
        return await stack.start()

    try:
        yield make
    finally:
        for stack in reversed(created):
            await stack.close()
