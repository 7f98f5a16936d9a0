"""A service rides out a broker restart: not ready while disconnected, ready again after."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import nats

from guestbus.broker import EmbeddedBroker
from guestbus.runtime import ServiceHost

from ..support.probes import free_port, http_get
from .sample_service import SampleService, SampleSettings


async def _wait_until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_service_reconnects_after_broker_restart(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path, port=0, monitor_port=None)
    await broker.start()
    port = broker.port
    prefix = f"r{uuid.uuid4().hex[:8]}"
    settings = SampleSettings(
        nats_url=broker.url, http_host="127.0.0.1", http_port=free_port(), sample_prefix=prefix
    )
    host = ServiceHost(SampleService(), settings)
    await host.start()
    assert host.http is not None
    http_port = host.http.port
    try:
        assert (await http_get(http_port, "/readyz"))[0] == 200
        await broker.stop()
        await _wait_until(lambda: not host.ready)
        status, body = await http_get(http_port, "/readyz")
        assert (status, body) == (503, b"not ready: NATS disconnected\n")
        assert b"guestbus_nats_connected 0.0" in (await http_get(http_port, "/metrics"))[1]

        broker = EmbeddedBroker(tmp_path, port=port, monitor_port=None)
        await broker.start()
        await _wait_until(lambda: host.ready)
        assert (await http_get(http_port, "/readyz"))[0] == 200
        assert b"guestbus_nats_connected 1.0" in (await http_get(http_port, "/metrics"))[1]
        nc = await nats.connect(broker.url)
        assert (await nc.request(f"{prefix}.echo", b"back", timeout=2)).data == b"back"
        await nc.close()
    finally:
        assert await host.stop()
        await broker.stop()
