"""Fixtures: ``ca`` — one broker + one running CA for a whole module; ``make_env`` — an
empty broker per test (lifecycle tests: first start, races, restarts)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ._support import CaEnv


@pytest.fixture(scope="module")
async def ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CaEnv]:
    env = await CaEnv(tmp_path_factory.mktemp("ca")).start()
    await env.host()
    try:
        yield env
    finally:
        await env.close()


@pytest.fixture
async def make_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Callable[..., Awaitable[CaEnv]]]:
    envs: list[CaEnv] = []

    async def make(provisioned: bool = True) -> CaEnv:
        env = CaEnv(tmp_path_factory.mktemp("ca-env"))
        envs.append(env)
        return await env.start(provisioned)

    try:
        yield make
    finally:
        for env in envs:
            await env.close()
