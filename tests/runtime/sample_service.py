"""A small service built on the runtime, used by the runtime tests.

Run it from the repository root with ``python -m tests.runtime.sample_service``. Settings: the
usual ``GUESTBUS_*`` plus ``GUESTBUS_SAMPLE_PREFIX`` (subject prefix), ``GUESTBUS_SAMPLE_DELAY``
(seconds the ``slow`` endpoint sleeps) and ``GUESTBUS_SAMPLE_CONCURRENCY``.
"""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.micro.request import Request
from pydantic import Field

from guestbus.runtime import BusError, BusService, ServiceContext, ServiceSettings, run_service


class SampleSettings(ServiceSettings):
    sample_prefix: str = Field(default="sample", description="Subject prefix of the endpoints.")
    sample_delay: float = Field(default=0.3, ge=0, description="Sleep of the slow endpoint.")
    sample_concurrency: int = Field(default=4, ge=1, description="Concurrency of slow.")


class SampleService(BusService):
    name = "sample"
    version = "1.2.3"
    description = "Sample service exercising the guestbus runtime"
    settings_cls = SampleSettings

    def __init__(self) -> None:
        self.received = 0
        self.events: list[bytes] = []

    async def setup(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        settings = ctx.settings_as(SampleSettings)
        self.delay = settings.sample_delay
        prefix = settings.sample_prefix
        await ctx.add_endpoint(
            "echo", self.echo, subject=f"{prefix}.echo", description="Answers with the request body"
        )
        await ctx.add_endpoint(
            "headers",
            self.with_headers,
            subject=f"{prefix}.headers",
            description="Answers with a reply header",
        )
        await ctx.add_endpoint(
            "refuse",
            self.refuse,
            subject=f"{prefix}.refuse",
            description="Always answers with a typed error",
        )
        await ctx.add_endpoint(
            "crash",
            self.crash,
            subject=f"{prefix}.crash",
            description="Raises an unexpected exception",
        )
        await ctx.add_endpoint(
            "slow",
            self.slow,
            subject=f"{prefix}.slow",
            description="Sleeps, then echoes",
            concurrency=settings.sample_concurrency,
        )
        await ctx.subscribe(f"{prefix}.events", self.on_event)

    async def echo(self, request: Request) -> bytes:
        return request.data

    async def with_headers(self, request: Request) -> tuple[bytes, dict[str, str]]:
        return b"with headers", {"X-Sample": "yes"}

    async def refuse(self, request: Request) -> bytes:
        raise BusError(
            "not_allowed",
            "the sample service refuses this; ask for echo instead",
            status=403,
            details={"asked": request.data.decode(errors="replace")},
        )

    async def crash(self, request: Request) -> bytes:
        raise RuntimeError("kaboom: secret internals")

    async def slow(self, request: Request) -> bytes:
        import asyncio

        self.received += 1
        self.ctx.log.info(
            "slow request received", extra={"seq": request.data.decode(), "count": self.received}
        )
        await asyncio.sleep(self.delay)
        return request.data

    async def on_event(self, msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("bad event")
        self.events.append(msg.data)


def main() -> None:
    run_service(SampleService)


if __name__ == "__main__":
    main()
