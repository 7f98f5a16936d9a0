"""Waiting for something to happen, and proving that something does not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> float:
    """Poll ``check`` (plain or async) until it holds; returns the seconds it took. Fails
    naming ``what``, with ``detail()`` below when given."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        await asyncio.sleep(interval)


async def holds(
    check: Callable[[], bool], duration: float, what: str, interval: float = 0.02
) -> None:
    """Assert that ``check`` stays true for ``duration`` seconds (proving that something
    does *not* happen takes an observation window)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    while loop.time() < end:
        assert check(), f"no longer true: {what}"
        await asyncio.sleep(interval)
