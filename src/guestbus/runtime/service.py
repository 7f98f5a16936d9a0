"""The base every host service is built on.

A service is a :class:`BusService` subclass: it declares its ``name``, ``version`` and
``description`` and adds its endpoints and subscriptions in :meth:`BusService.setup` through
the :class:`ServiceContext`. :func:`run_service` is the console-script entry point; it loads
settings, sets up JSON logging, runs the service on uvloop (or asyncio) and shuts it down
gracefully on SIGTERM/SIGINT: every request the service had received is answered first.

Shutdown order (see docs/runtime.md): mark not ready → drain the endpoint and plain
subscriptions (stop intake, handle everything already queued) → wait for in-flight handler
tasks → cancel background tasks → ``teardown`` → ``nc.drain()`` → stop the probe server.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ClassVar, NoReturn, TypeVar, Union, cast

import nats.micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.micro.request import Request
from nats.micro.service import NAME_REGEX, SEMVER_REGEX, Endpoint, Service
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from guestbus.runtime.errors import INTERNAL, BusError
from guestbus.runtime.http import ProbeServer
from guestbus.runtime.logs import setup_logging
from guestbus.runtime.metrics import Children
from guestbus.runtime.nats import connect, drain_subscription, flush_interest
from guestbus.runtime.settings import ServiceSettings, load_settings

T = TypeVar("T")
S = TypeVar("S", bound=ServiceSettings)

Reply = Union[bytes, tuple[bytes, dict[str, str]]]
"""What an endpoint handler returns: the reply body, optionally with reply headers."""
Handler = Callable[[Request], Awaitable[Reply]]
"""An endpoint handler."""
MsgHandler = Callable[[Msg], Awaitable[None]]
"""A plain subscription callback."""

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

_runtime_log = logging.getLogger("guestbus.runtime")


# --------------------------------------------------------------------------------------
# nats.micro internals, touched in exactly one place.
#
# nats.micro has no public way to stop intake on an endpoint without dropping the requests
# already queued in the client (``Service.stop()`` *unsubscribes*). To shut down without
# losing requests we drain each endpoint's subscription ourselves, which needs the private
# ``Endpoint._subscription``; the micro ``Endpoint`` object itself is only reachable through
# the private ``Service._endpoints``. Error counters for ``$SRV.STATS`` are private too (our
# wrapper answers errors itself, so micro never sees them). Keep all of it here.
# --------------------------------------------------------------------------------------


def _micro_endpoint(micro: Service, name: str, subject: str) -> Endpoint | None:
    for endpoint in reversed(getattr(micro, "_endpoints", [])):
        if getattr(endpoint, "_name", None) == name and getattr(endpoint, "_subject", None) == (
            subject
        ):
            return cast(Endpoint, endpoint)
    return None


def _micro_endpoint_subscription(endpoint: Endpoint) -> Subscription | None:
    sub = getattr(endpoint, "_subscription", None)
    return sub if isinstance(sub, Subscription) else None


def _micro_record_error(endpoint: Endpoint | None, err: BusError) -> None:
    if endpoint is not None and hasattr(endpoint, "_num_errors"):
        endpoint._num_errors += 1
        endpoint._last_error = f"{err.status}:{err.message}"  # type: ignore[assignment]


# --------------------------------------------------------------------------------------


class _TaskTracker:
    """Handler tasks the runtime must wait for at shutdown."""

    def __init__(self, log: logging.Logger) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = log

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error(
                "task %s failed",
                task.get_name(),
                exc_info=task.exception(),
                extra={"task": task.get_name()},
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float) -> bool:
        """Wait for all tasks (including ones spawned meanwhile); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def cancel_all(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "guestbus_requests_total",
            "Requests (endpoints) and messages (subscriptions) handled, by outcome "
            "(ok, error = a BusError, internal = an unexpected exception).",
            ["service", "endpoint", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "guestbus_request_duration_seconds",
            "Handler duration in seconds (reply sent included).",
            ["service", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "guestbus_requests_in_flight",
            "Handler calls currently running.",
            ["service", "endpoint"],
            registry=registry,
        )
        self._in_flight_of = Children(self.in_flight)
        self._requests_of = Children(self.requests)
        self._duration_of = Children(self.duration)

    def started(self, service: str, endpoint: str) -> Any:
        """``in_flight{service, endpoint}``, incremented; ``dec()`` it when done."""
        gauge = self._in_flight_of(service, endpoint)
        gauge.inc()
        return gauge

    def finished(self, service: str, endpoint: str, outcome: str, seconds: float) -> None:
        """Count a handled request and observe its duration."""
        self._requests_of(service, endpoint, outcome).inc()
        self._duration_of(service, endpoint).observe(seconds)


class ServiceContext:
    """What a service gets in :meth:`BusService.setup`: the connection, JetStream, settings,
    logger, metrics registry, the nats.micro service, and ways to add endpoints,
    subscriptions and background tasks that the runtime shuts down in order."""

    def __init__(
        self,
        *,
        service_name: str,
        nc: Client,
        js: JetStreamContext,
        settings: ServiceSettings,
        log: logging.Logger,
        registry: CollectorRegistry,
        micro: Service,
    ) -> None:
        self.service_name = service_name
        self.nc = nc
        self.js = js
        self.settings = settings
        self.log = log
        self.registry = registry
        self.micro = micro
        self._metrics = _Metrics(registry)
        self._handlers = _TaskTracker(log)
        self._background = _TaskTracker(log)
        self._endpoints: list[Endpoint] = []
        self._subscriptions: list[Subscription] = []

    def settings_as(self, cls: type[S]) -> S:
        """``settings`` typed as the service's own settings class."""
        if not isinstance(self.settings, cls):
            raise TypeError(f"settings are {type(self.settings).__name__}, not {cls.__name__}")
        return self.settings

    @property
    def in_flight(self) -> int:
        """Handler tasks currently running (``concurrency > 1`` endpoints/subscriptions)."""
        return len(self._handlers)

    async def add_endpoint(
        self,
        name: str,
        handler: Handler,
        *,
        subject: str | None = None,
        queue_group: str | None = None,
        description: str = "",
        concurrency: int = 1,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Register a nats.micro endpoint ``name`` on ``subject`` (default: ``name``).

        ``handler(request)`` returns the reply body, or ``(body, headers)``. A raised
        :class:`BusError` becomes a typed error reply; any other exception becomes an
        ``internal`` (500) error reply and is logged with its traceback. With
        ``concurrency > 1`` up to that many calls run at once (as tracked tasks);
        otherwise requests are handled one at a time in arrival order.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not description:
            self.log.warning("endpoint %s has no description", name, extra={"endpoint": name})
        endpoint_subject = subject or name
        meta = {"description": description, "concurrency": str(concurrency)}
        meta.update(metadata or {})
        holder: list[Endpoint | None] = [None]

        async def invoke(request: Request) -> None:
            await self._invoke_endpoint(name, handler, request, holder[0])

        micro_handler = self._dispatcher(name, invoke, concurrency)
        await self.micro.add_endpoint(
            name=name,
            handler=micro_handler,
            subject=endpoint_subject,
            queue_group=queue_group,
            metadata=meta,
        )
        endpoint = _micro_endpoint(self.micro, name, endpoint_subject)
        holder[0] = endpoint
        if endpoint is not None:
            self._endpoints.append(endpoint)
        self.log.debug(
            "endpoint added",
            extra={"endpoint": name, "subject": endpoint_subject, "concurrency": concurrency},
        )

    async def subscribe(
        self,
        subject: str,
        cb: MsgHandler,
        queue: str = "",
        *,
        concurrency: int = 1,
    ) -> Subscription:
        """A plain subscription, shut down like endpoints (drained, in-flight awaited).

        Exceptions from ``cb`` are logged and counted, never fatal. ``concurrency`` as in
        :meth:`add_endpoint`.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")

        async def invoke(msg: Msg) -> None:
            await self._invoke_plain(subject, cb, msg)

        sub = await self.nc.subscribe(
            subject, queue=queue, cb=self._dispatcher(subject, invoke, concurrency)
        )
        self._subscriptions.append(sub)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """End a subscription of :meth:`subscribe` before shutdown (e.g. for a VM that is
        gone): drained, so the messages it had received are still handled."""
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)
        await drain_subscription(sub)

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str | None = None
    ) -> asyncio.Task[Any]:
        """Run a background task (e.g. a periodic scan). It is cancelled at shutdown, after
        intake stopped and in-flight handlers finished, before ``teardown``. A failure is
        logged."""
        return self._background.spawn(coro, name=name)

    # ---- internals -----------------------------------------------------------------

    def _dispatcher(
        self, label: str, invoke: Callable[[T], Awaitable[None]], concurrency: int
    ) -> Callable[[T], Awaitable[None]]:
        if concurrency == 1:
            return invoke
        sem = asyncio.Semaphore(concurrency)

        async def run(item: T) -> None:
            try:
                await invoke(item)
            finally:
                sem.release()

        async def dispatch(item: T) -> None:
            # Blocking here keeps the rest queued in the subscription (drained at shutdown).
            await sem.acquire()
            try:
                self._handlers.spawn(run(item), name=f"{self.service_name}:{label}")
            except BaseException:
                sem.release()
                raise

        return dispatch

    async def _invoke_endpoint(
        self, name: str, handler: Handler, request: Request, endpoint: Endpoint | None
    ) -> None:
        started = time.perf_counter()
        in_flight = self._metrics.started(self.service_name, name)
        outcome = "ok"
        try:
            try:
                result = await handler(request)
                raw, headers = result if isinstance(result, tuple) else (result, None)
                if not isinstance(raw, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"handler returned {type(raw).__name__}, expected bytes or (bytes, headers)"
                    )
                data = bytes(raw)
            except BusError as err:
                outcome = "error"
                await self._respond_error(request, err, endpoint)
            except Exception:
                outcome = "internal"
                self.log.exception(
                    "unhandled exception in endpoint handler",
                    extra={"endpoint": name, "subject": request.subject},
                )
                internal = BusError(
                    INTERNAL,
                    f"internal error in {self.service_name} while handling {name}; "
                    "the cause is in the service's log",
                    500,
                )
                await self._respond_error(request, internal, endpoint)
            else:
                await self._respond(request, data, headers)
        finally:
            in_flight.dec()
            self._metrics.finished(self.service_name, name, outcome, time.perf_counter() - started)

    async def _respond_error(
        self, request: Request, err: BusError, endpoint: Endpoint | None
    ) -> None:
        _micro_record_error(endpoint, err)
        await self._respond(request, err.to_bytes(), err.headers())

    async def _respond(self, request: Request, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            await request.respond(data, headers=headers)
        except ValueError:
            # published without a reply subject: nobody to answer
            self.log.debug("request without reply subject", extra={"subject": request.subject})
        except Exception as exc:
            self.log.warning(
                "could not send reply: %s",
                exc or type(exc).__name__,
                extra={"subject": request.subject},
            )

    async def _invoke_plain(self, subject: str, cb: MsgHandler, msg: Msg) -> None:
        started = time.perf_counter()
        in_flight = self._metrics.started(self.service_name, subject)
        outcome = "ok"
        try:
            await cb(msg)
        except Exception:
            outcome = "internal"
            self.log.exception(
                "unhandled exception in subscription callback",
                extra={"subscription": subject, "subject": msg.subject},
            )
        finally:
            in_flight.dec()
            self._metrics.finished(
                self.service_name, subject, outcome, time.perf_counter() - started
            )

    def _intake(self) -> list[Subscription]:
        subs = [_micro_endpoint_subscription(e) for e in self._endpoints]
        return [s for s in subs if s is not None] + list(self._subscriptions)


class BusService(abc.ABC):
    """Base class of every host service.

    Subclasses set ``name`` (``[A-Za-z0-9_-]+``, the nats.micro service name), ``version``
    (semver), ``description`` and optionally ``settings_cls``, and implement :meth:`setup`.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    settings_cls: ClassVar[type[ServiceSettings]] = ServiceSettings

    @abc.abstractmethod
    async def setup(self, ctx: ServiceContext) -> None:
        """Add endpoints, subscriptions and background tasks."""

    async def teardown(self, ctx: ServiceContext) -> None:  # noqa: B027 - optional hook
        """Release resources; called after in-flight work finished, before ``nc.drain()``.
        Only called when :meth:`setup` completed."""

    @classmethod
    def check_declaration(cls) -> None:
        """Raise ``TypeError`` when name/version/description are missing or invalid."""
        for attr in ("name", "version", "description"):
            if not isinstance(getattr(cls, attr, None), str):
                raise TypeError(f"{cls.__name__}.{attr} must be set to a string")
        if not NAME_REGEX.match(cls.name):
            raise TypeError(f"{cls.__name__}.name {cls.name!r} must match [A-Za-z0-9_-]+")
        if not SEMVER_REGEX.match(cls.version):
            raise TypeError(f"{cls.__name__}.version {cls.version!r} is not a semantic version")
        if not cls.description.strip():
            raise TypeError(f"{cls.__name__}.description must not be empty")


class _ServiceStateCollector(Collector):
    """``guestbus_service_info`` and ``guestbus_service_ready``, read at scrape time."""

    def __init__(self, host: ServiceHost) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        svc = type(self.host.service)
        info = GaugeMetricFamily(
            "guestbus_service_info",
            "Always 1: which guestbus service and version this process runs.",
            labels=["service", "version"],
        )
        info.add_metric([svc.name, svc.version], 1)
        yield info
        ready = GaugeMetricFamily(
            "guestbus_service_ready",
            "1 while /readyz answers 200 (NATS connected, set up, not shutting down), else 0.",
            labels=["service"],
        )
        ready.add_metric([svc.name], 1 if self.host.ready else 0)
        yield ready


class ServiceHost:
    """Runs one :class:`BusService` instance: probes, connection, micro registration,
    setup, and the ordered shutdown. Usable in-process (tests) as well as by
    :func:`run_service`."""

    def __init__(
        self,
        service: BusService,
        settings: ServiceSettings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        type(service).check_declaration()
        self.service = service
        self.settings = settings
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        registry.register(_ServiceStateCollector(self))
        self.log = logging.getLogger(f"guestbus.{service.name}")
        self.nc: Client | None = None
        self.ctx: ServiceContext | None = None
        self.http: ProbeServer | None = None
        self.failed = asyncio.Event()
        """Set when the service can no longer work (NATS connection closed for good)."""
        self._started = False
        self._setup_done = False
        self._stopping = False
        self._stopped = False

    # ---- readiness -----------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if self.nc is None:
            return False, "connecting to NATS"
        if not self.nc.is_connected:
            return False, "NATS disconnected"
        if not self._started:
            return False, "starting"
        return True, "ready"

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start probes, connect (retrying forever), register with nats.micro, run setup."""
        svc = type(self.service)
        if self.settings.http_port:
            self.http = ProbeServer(
                self.settings.http_host, self.settings.http_port, self.registry, self.readiness
            )
            await self.http.start()
            self.log.info(
                "probe server listening",
                extra={"http_host": self.settings.http_host, "http_port": self.http.port},
            )
        self.nc = await connect(
            self.settings, svc.name, registry=self.registry, on_closed=self._on_closed
        )
        micro = await nats.micro.add_service(
            self.nc, name=svc.name, version=svc.version, description=svc.description
        )
        self.ctx = ServiceContext(
            service_name=svc.name,
            nc=self.nc,
            js=self.nc.jetstream(),
            settings=self.settings,
            log=self.log,
            registry=self.registry,
            micro=micro,
        )
        await self.service.setup(self.ctx)
        self._setup_done = True
        await flush_interest(self.nc)  # endpoints reachable before we report ready
        self._started = True
        self.log.info(
            "service started",
            extra={
                "version": svc.version,
                "instance": micro.id,
                "endpoints": [e.name for e in micro.info().endpoints],
            },
        )

    def _on_closed(self) -> None:
        if not self._stopping:
            self.log.error("NATS connection closed unexpectedly; the service will exit")
            self.failed.set()

    async def stop(self) -> bool:
        """Graceful shutdown; True when everything finished within ``shutdown_timeout``."""
        if self._stopped:
            return True
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout

        def remaining() -> float:
            return max(0.1, deadline - loop.time())

        clean = True
        ctx, nc = self.ctx, self.nc
        self.log.info("shutting down", extra={"in_flight": ctx.in_flight if ctx else 0})
        if ctx is not None and nc is not None and not nc.is_closed:
            # 1. stop intake; everything already received is still handled
            intake = ctx._intake()
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(drain_subscription(s) for s in intake)), remaining()
                )
            except Exception as exc:
                clean = False
                self.log.error("draining subscriptions failed: %r", exc)
            # 2. in-flight handler tasks
            if not await ctx._handlers.wait(remaining()):
                clean = False
                self.log.error(
                    "shutdown timeout: handlers still running",
                    extra={"in_flight": len(ctx._handlers)},
                )
        if ctx is not None:
            # 3. background tasks, 4. teardown
            await ctx._background.cancel_all()
            if self._setup_done:
                try:
                    await asyncio.wait_for(self.service.teardown(ctx), remaining())
                except Exception:
                    clean = False
                    self.log.exception("teardown failed")
        # 5. flush replies and close
        if nc is not None and not nc.is_closed:
            try:
                if nc.is_connected:
                    await asyncio.wait_for(nc.drain(), remaining())
                else:
                    await nc.close()
            except Exception as exc:
                clean = False
                self.log.error("closing the NATS connection failed: %r", exc)
                with contextlib.suppress(Exception):
                    await nc.close()
        # 6. probes
        if self.http is not None:
            await self.http.stop()
        self._stopped = True
        self.log.info("service stopped", extra={"clean": clean})
        return clean


async def serve(
    service: BusService,
    settings: ServiceSettings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run ``service`` until ``stop`` is set (or SIGTERM/SIGINT); return the exit status.

    0 after a clean shutdown; 1 when startup failed, the connection was lost for good, or
    the shutdown exceeded ``settings.shutdown_timeout``.
    """
    stop = stop if stop is not None else asyncio.Event()
    host = ServiceHost(service, settings, registry=registry)
    log = host.log
    loop = asyncio.get_running_loop()
    if handle_signals:
        received: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            if received:
                log.warning("second %s during shutdown: exiting now", sig.name)
                sys.stdout.flush()
                os._exit(1)
            received.append(sig.name)
            log.info("received %s; shutting down gracefully", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    status = 0
    start_task = asyncio.create_task(host.start(), name="service-start")
    stop_task = asyncio.create_task(stop.wait(), name="service-stop")
    fail_task = asyncio.create_task(host.failed.wait(), name="service-failed")
    try:
        await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if not start_task.done():
            start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start_task
        elif start_task.exception() is not None:
            log.error("service failed to start", exc_info=start_task.exception())
            status = 1
        else:
            await asyncio.wait({stop_task, fail_task}, return_when=asyncio.FIRST_COMPLETED)
            if host.failed.is_set():
                status = 1
        if not await host.stop():
            status = 1
    finally:
        for task in (stop_task, fail_task):
            task.cancel()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return status


def run_loop(main: Coroutine[Any, Any, T], event_loop: str = "uvloop") -> T:
    """Run ``main`` on uvloop (when ``event_loop == "uvloop"`` and installed) or asyncio."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            _runtime_log.warning("uvloop is not installed; using the asyncio event loop")
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def run_service(service_cls: type[BusService]) -> NoReturn:
    """Console-script entry: settings from the environment (exit 2 when invalid), JSON
    logging, run until SIGTERM/SIGINT, exit 0 after a graceful shutdown."""
    service_cls.check_declaration()
    settings = load_settings(service_cls.settings_cls)
    setup_logging(service_cls.name, settings.log_level)
    status = run_loop(serve(service_cls(), settings), settings.event_loop)
    logging.shutdown()
    raise SystemExit(status)
