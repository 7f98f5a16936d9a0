"""The service runtime in-process against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client

from guestbus.contract import HEADER_ERROR_CODE, ErrorBody
from guestbus.runtime import BusError, BusService, ServiceContext, ServiceHost, check_reply
from guestbus.runtime.errors import MICRO_ERROR_CODE_HEADER, MICRO_ERROR_HEADER

from ..support.probes import free_port, http_get, http_request
from .sample_service import SampleService, SampleSettings

if TYPE_CHECKING:
    from tests.conftest import NatsServer


class Sample:
    """A started sample service with a unique name and subject prefix."""

    def __init__(self, host: ServiceHost, service: SampleService, prefix: str) -> None:
        self.host = host
        self.service = service
        self.prefix = prefix
        self.name = type(service).name

    @property
    def http_port(self) -> int:
        assert self.host.http is not None
        return self.host.http.port

    def subject(self, endpoint: str) -> str:
        return f"{self.prefix}.{endpoint}"


@pytest.fixture
async def sample(nats_server: NatsServer) -> AsyncIterator[Sample]:
    tag = uuid.uuid4().hex[:8]
    cls = type(f"Sample_{tag}", (SampleService,), {"name": f"sample-{tag}"})
    service = cls()
    settings = SampleSettings(
        nats_url=nats_server.url,
        http_host="127.0.0.1",
        http_port=free_port(),
        sample_prefix=f"t{tag}",
        sample_delay=0.3,
        sample_concurrency=4,
    )
    host = ServiceHost(service, settings)
    await host.start()
    try:
        yield Sample(host, service, settings.sample_prefix)
    finally:
        await host.stop()


async def _json_request(nc: Client, subject: str) -> dict[str, Any]:
    msg = await nc.request(subject, b"", timeout=2)
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def test_micro_ping_info_stats(sample: Sample, nc: Client) -> None:
    ping = await _json_request(nc, f"$SRV.PING.{sample.name}")
    assert ping["name"] == sample.name
    assert ping["version"] == "1.2.3"
    assert ping["type"] == "io.nats.micro.v1.ping_response"

    info = await _json_request(nc, f"$SRV.INFO.{sample.name}")
    assert info["description"] == SampleService.description
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert set(endpoints) == {"echo", "headers", "refuse", "crash", "slow"}
    assert endpoints["echo"]["subject"] == sample.subject("echo")
    assert endpoints["echo"]["metadata"]["description"] == "Answers with the request body"
    assert endpoints["slow"]["metadata"]["concurrency"] == "4"

    await nc.request(sample.subject("echo"), b"x", timeout=2)
    await nc.request(sample.subject("refuse"), b"x", timeout=2)
    stats = await _json_request(nc, f"$SRV.STATS.{sample.name}")
    by_name = {e["name"]: e for e in stats["endpoints"]}
    assert by_name["echo"]["num_requests"] == 1
    assert by_name["refuse"]["num_errors"] == 1
    assert by_name["refuse"]["last_error"].startswith("403:")


async def test_replies_and_headers(sample: Sample, nc: Client) -> None:
    msg = await nc.request(sample.subject("echo"), b"hello", timeout=2)
    assert msg.data == b"hello"
    assert check_reply(msg.headers, msg.data) == b"hello"
    msg = await nc.request(sample.subject("headers"), b"", timeout=2)
    assert msg.data == b"with headers"
    assert msg.headers is not None and msg.headers["X-Sample"] == "yes"


async def test_bus_error_is_typed(sample: Sample, nc: Client) -> None:
    msg = await nc.request(sample.subject("refuse"), b"please", timeout=2)
    assert msg.headers is not None
    assert msg.headers[MICRO_ERROR_CODE_HEADER] == "403"
    assert (
        msg.headers[MICRO_ERROR_HEADER] == "the sample service refuses this; ask for echo instead"
    )
    assert msg.headers[HEADER_ERROR_CODE] == "not_allowed"
    body = ErrorBody.model_validate_json(msg.data)
    assert body.code == "not_allowed"
    assert body.details == {"asked": "please"}
    with pytest.raises(BusError) as info:
        check_reply(msg.headers, msg.data)
    assert (info.value.code, info.value.status) == ("not_allowed", 403)


async def test_unexpected_exception_is_internal_and_service_survives(
    sample: Sample, nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        msg = await nc.request(sample.subject("crash"), b"", timeout=2)
    assert msg.headers is not None
    assert msg.headers[MICRO_ERROR_CODE_HEADER] == "500"
    assert msg.headers[HEADER_ERROR_CODE] == "internal"
    body = ErrorBody.model_validate_json(msg.data)
    assert body.code == "internal"
    assert "kaboom" not in body.message  # internals stay in the log
    logged = [r for r in caplog.records if r.exc_info and "kaboom" in str(r.exc_info[1])]
    assert logged, "the exception must be logged with its traceback"
    assert getattr(logged[0], "endpoint", None) == "crash"
    # still serving
    for _ in range(3):
        assert (await nc.request(sample.subject("echo"), b"ok", timeout=2)).data == b"ok"
        await nc.request(sample.subject("crash"), b"", timeout=2)


async def test_probes_and_metrics(sample: Sample, nc: Client) -> None:
    await nc.request(sample.subject("echo"), b"x", timeout=2)
    await nc.request(sample.subject("refuse"), b"x", timeout=2)
    port = sample.http_port
    assert await http_get(port, "/healthz") == (200, b"ok\n")
    assert await http_get(port, "/readyz") == (200, b"ready\n")
    status, body = await http_get(port, "/metrics")
    assert status == 200
    text = body.decode()
    name = sample.name
    assert f'guestbus_requests_total{{endpoint="echo",outcome="ok",service="{name}"}} 1.0' in text
    assert (
        f'guestbus_requests_total{{endpoint="refuse",outcome="error",service="{name}"}} 1.0' in text
    )
    assert "guestbus_request_duration_seconds_bucket" in text
    assert "guestbus_nats_connected 1.0" in text
    assert (await http_get(port, "/readyz?verbose=1"))[0] == 200
    assert (await http_get(port, "/nope"))[0] == 404
    assert (await http_get(port, "/healthz", method="POST"))[0] == 405
    status, head, body = await http_request(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and "Content-Length: 3" in head
    status, _, _ = await http_request(port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000)
    assert status == 431
    status, _, _ = await http_request(port, b"garbage\r\n\r\n")
    assert status == 400


async def test_concurrency_runs_handlers_in_parallel(sample: Sample, nc: Client) -> None:
    started = time.monotonic()
    replies = await asyncio.gather(
        *(nc.request(sample.subject("slow"), str(i).encode(), timeout=5) for i in range(8))
    )
    elapsed = time.monotonic() - started
    assert sorted(int(r.data) for r in replies) == list(range(8))
    # 8 requests x 0.3 s with 4 at a time: ~0.6 s (one at a time would be 2.4 s)
    assert elapsed < 1.5, elapsed
    assert sample.service.received == 8
    assert sample.host.ctx is not None and sample.host.ctx.in_flight == 0


async def test_plain_subscription(sample: Sample, nc: Client) -> None:
    await nc.publish(sample.subject("events"), b"bad")  # raises in the callback: logged
    await nc.publish(sample.subject("events"), b"one")
    await nc.flush()
    for _ in range(100):
        if sample.service.events:
            break
        await asyncio.sleep(0.01)
    assert sample.service.events == [b"one"]
    _, body = await http_get(sample.http_port, "/metrics")
    assert f'endpoint="{sample.subject("events")}",outcome="internal"' in body.decode()


async def test_readiness_and_shutdown(nats_server: NatsServer, nc: Client) -> None:
    class Tiny(BusService):
        name = f"tiny-{uuid.uuid4().hex[:6]}"
        version = "0.1.0"
        description = "tiny"

        def __init__(self) -> None:
            self.torn_down = False

        async def setup(self, ctx: ServiceContext) -> None:
            async def hello(request: Any) -> bytes:
                return b"hi"

            await ctx.add_endpoint("hello", hello, subject=f"{self.name}.hello", description="hi")
            ctx.spawn(asyncio.sleep(3600), name="forever")

        async def teardown(self, ctx: ServiceContext) -> None:
            self.torn_down = True

    settings = SampleSettings(nats_url=nats_server.url, http_port=0)
    service = Tiny()
    host = ServiceHost(service, settings)
    assert host.readiness() == (False, "connecting to NATS")
    await host.start()
    assert host.readiness() == (True, "ready")
    assert (await nc.request(f"{Tiny.name}.hello", b"", timeout=2)).data == b"hi"
    assert await host.stop() is True
    assert host.readiness() == (False, "shutting down")
    assert service.torn_down
    assert host.nc is not None and host.nc.is_closed


def test_declaration_is_checked() -> None:
    class Bad(BusService):
        name = "bad name"
        version = "1"
        description = "x"

        async def setup(self, ctx: ServiceContext) -> None:
            return None

    with pytest.raises(TypeError, match="must match"):
        Bad.check_declaration()
