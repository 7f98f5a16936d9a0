"""One secured stack for the deploy tests (permissions, and the metrics the dashboards use)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._stack import SecureStack


@pytest.fixture(scope="package")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecureStack]:
    secured = SecureStack(tmp_path_factory.mktemp("deploy"))
    try:
        yield await secured.start()
    finally:
        await secured.close()
