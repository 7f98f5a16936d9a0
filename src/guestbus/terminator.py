"""The host end of one VM's link, whatever carries it: QEMU's serial socket or mutual TLS.

The serial-bridge and rpc-router's TLS gateway both run this; only the byte stream and the
source of the identity differ (the socket a frame came from, or the client certificate).
Everything read here is stamped with that identity; nothing the guest writes changes it.

- guest requests go to ``gb.rpc.<method>`` with the ``GB-VM``/``GB-Link``/``GB-Host`` stamp;
- while the link is up, ``gb.guest.<vm>.*`` is served here, each command with a deadline and
  a retried ``GB-Request-Id`` joining the copy already running;
- writes never block: a guest that stops reading gets ``unavailable`` answers;
- a per-VM token bucket answers floods with ``rate_limited``; bad frames are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from prometheus_client import CollectorRegistry, Counter, Histogram

from guestbus.contract import (
    AGENT_COMMANDS,
    EVT_GUEST,
    EVT_LINK,
    HEADER_DEADLINE_MS,
    HEADER_HOST,
    HEADER_LINK,
    HEADER_REQUEST_ID,
    HEADER_VM,
    HEADER_VM_NAME,
    RPC_ENROLL,
    RPC_HEARTBEAT,
    RPC_HELLO,
    RPC_RENEW,
    RPC_REPORT,
    RPC_SSR_ATTACH,
    RPC_SSR_ATTACHED,
    RPC_SSR_DETACH,
    RPC_SSR_LIST,
    SSR_FORWARD,
    LinkEvent,
    LinkKind,
    LinkState,
    evt_subject,
    guest_wildcard,
    rpc_subject,
)
from guestbus.ratelimit import TokenBucket
from guestbus.runtime import BusError
from guestbus.runtime.metrics import Children
from guestbus.runtime.nats import drain_subscription, flush_interest
from guestbus.wire import MAX_FRAME, Session, SessionState, errors, valid_id
from guestbus.wire.aio import Channel, LinkClosed, RemoteError

log = logging.getLogger("guestbus.link")

GUEST_RPCS = frozenset({RPC_HELLO, RPC_HEARTBEAT, RPC_REPORT, RPC_ENROLL, RPC_RENEW, *SSR_FORWARD})
"""Guest-initiated RPCs a terminator forwards to ``gb.rpc.<method>`` (rpc-router serves them)."""
KNOWN_METHODS = frozenset(AGENT_COMMANDS) | GUEST_RPCS
"""Method names that get their own metrics label (anything else is ``other``)."""
SLOW_GUEST_RPCS = {
    RPC_SSR_ATTACH: 90.0,
    RPC_SSR_DETACH: 90.0,
    RPC_SSR_LIST: 20.0,
    RPC_SSR_ATTACHED: 20.0,
}
"""Guest RPCs that wait on the hypervisor (a disk hot-plug) get longer than ``rpc_timeout``;
the guest's own deadline still bounds them."""
MAX_COMMAND_TIMEOUT = 600.0
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

STATUS = {
    errors.BAD_REQUEST: 400,
    errors.NOT_ALLOWED: 403,
    errors.UNKNOWN_METHOD: 404,
    errors.IDENTITY_MISMATCH: 403,
    errors.TOO_LARGE: 413,
    errors.RATE_LIMITED: 429,
    errors.TIMEOUT: 504,
    errors.NO_ACTIVE_LINK: 503,
    errors.HELLO_REQUIRED: 503,
    errors.LINK_LOST: 503,
    errors.UNAVAILABLE: 503,
    errors.INTERNAL: 500,
    errors.BAD_SIGNATURE: 403,
    errors.STALE: 409,
}
"""HTTP-like status of each wire error code, for the nats.micro error headers."""


@dataclass(frozen=True)
class LinkLimits:
    rpc_timeout: float = 5.0
    command_timeout: float = 10.0
    rate_limit: float = 50.0
    rate_burst: int = 200
    write_limit: int = 1 << 20
    max_frame: int = MAX_FRAME


class LinkMetrics:
    """Per-terminator metrics, named ``<prefix>_…`` (``guestbus_bridge``, ``guestbus_gateway``)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.drops = Counter(
            f"{prefix}_bad_frames_total",
            "Frames from guests dropped or refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            f"{prefix}_rpc_seconds",
            "Guest RPC round trip through the bus (terminator → router → terminator).",
            ["method", "outcome"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.command_seconds = Histogram(
            f"{prefix}_command_seconds",
            "Host → guest command round trip over the link.",
            ["method", "outcome"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.link_changes = Counter(
            f"{prefix}_link_changes_total",
            "Links that went up or down here.",
            ["state"],
            registry=registry,
        )
        self._rpc = Children(self.rpc_seconds)
        self._command = Children(self.command_seconds)
        self._drops = Children(self.drops)

    def drop(self, reason: str) -> None:
        self._drops(reason).inc()

    def observe_rpc(self, method: str, outcome: str, seconds: float) -> None:
        """``rpc_seconds{method, outcome}`` (``method`` as labelled by :func:`_label`)."""
        self._rpc(method, outcome).observe(seconds)

    def observe_command(self, method: str, outcome: str, seconds: float) -> None:
        """``command_seconds{method, outcome}`` (``method`` as labelled by :func:`_label`)."""
        self._command(method, outcome).observe(seconds)


def _label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class Terminator:
    """One VM's link on the host side. Reused across reconnects of the same VM, so the
    session's memory of answered guest requests survives a QEMU socket reconnect."""

    def __init__(
        self,
        nc: Client,
        vm: str,
        kind: LinkKind,
        host: str,
        *,
        metrics: LinkMetrics,
        limits: LinkLimits | None = None,
        name: str | None = None,
        on_change: Callable[[], None] | None = None,
        hello_check: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        self.vm = vm
        self.kind = kind
        self.host = host
        self._name = name
        self._headers = self._stamp()
        self.metrics = metrics
        self.limits = limits or LinkLimits()
        self.on_change = on_change
        self.hello_check = hello_check
        self.session = Session(max_frame=self.limits.max_frame)
        self.bucket = TokenBucket(self.limits.rate_limit, self.limits.rate_burst)
        self.channel: Channel | None = None
        self.up = False
        self.connected = False
        self.connects = 0
        self.sub: Subscription | None = None
        self.commands: set[asyncio.Task[None]] = set()
        self.retiring: set[asyncio.Task[None]] = set()
        """Command subscriptions of earlier ups, draining."""
        # Host commands in flight by GB-Request-Id, so that a retry joins the running copy.
        self.inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.session.state is SessionState.READY

    # --- one connection ----------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run the link over one connection until it closes."""
        self.connects += 1
        self.connected = True
        channel = Channel(
            reader,
            writer,
            self.session,
            on_request=self.guest_rpc,
            on_hello=self.guest_hello,
            on_event=self.guest_event,
            on_drop=self.metrics.drop,
            write_limit=self.limits.write_limit,
        )
        self.channel = channel
        try:
            await channel.run()
        except OSError as exc:
            log.info("link of VM %s (%s) failed: %s", self.vm, self.kind.value, exc)
        finally:
            if self.channel is channel:
                self.channel = None
            self.connected = False
            await channel.close()
            await self.set_down(f"{self.kind.value} connection closed")

    async def close(self, reason: str) -> None:
        channel = self.channel
        if channel is not None:
            await channel.close()
        await self.set_down(reason)
        if self.retiring:
            await asyncio.wait(set(self.retiring), timeout=self.limits.command_timeout)
        if self.commands:
            await asyncio.wait(set(self.commands), timeout=self.limits.command_timeout)

    # --- up / down -----------------------------------------------------------------------------

    async def _serve_commands(self) -> None:
        """Serve host → guest commands only while the link is (coming) up: a VM without an
        active link then has no responder and its callers learn it at once. Called before
        the hello reaches rpc-router, so that by the time the registry says the link is up
        the server knows this subscription (a command in between gets no_active_link)."""
        if self.sub is None:
            self.sub = await self.nc.subscribe(guest_wildcard(self.vm), cb=self._command_cb)
            with contextlib.suppress(Exception):
                await flush_interest(self.nc)

    async def _stop_serving(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            retiring = asyncio.ensure_future(self._retire(sub))
            self.retiring.add(retiring)
            retiring.add_done_callback(self.retiring.discard)

    async def _set_up(self) -> None:
        if self.up:
            return
        self.up = True
        await self._serve_commands()
        self._changed()
        await self._publish_link(LinkState.UP, None)

    async def set_down(self, reason: str) -> None:
        if not self.up:
            await self._stop_serving()  # a hello that never completed
            return
        self.up = False
        await self._stop_serving()
        self._changed()
        await self._publish_link(LinkState.DOWN, reason)

    @staticmethod
    async def _retire(sub: Subscription) -> None:
        """Drain, not unsubscribe: a command the server delivered before it saw our UNSUB is
        still answered (``no_active_link``) instead of being dropped unanswered, which would
        leave its caller waiting out its whole timeout. A task of its own, never cancelled
        half-way: nats-py's PING/PONG bookkeeping does not survive a cancelled flush."""
        try:
            await drain_subscription(sub)
        except Exception:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _publish_link(self, state: LinkState, reason: str | None) -> None:
        self.metrics.link_changes.labels(state.value).inc()
        event = LinkEvent(vm=self.vm, state=state, link=self.kind, host=self.host, reason=reason)
        try:
            await self.nc.publish(evt_subject(EVT_LINK, self.vm), event.model_dump_json().encode())
        except Exception as exc:
            log.warning("could not publish link event for %s: %s", self.vm, exc)
        log.info(
            "link %s",
            state.value,
            extra={"vm": self.vm, "link": self.kind.value, "reason": reason},
        )

    # --- guest → host ----------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, name: str | None) -> None:
        self._name = name
        self._headers = self._stamp()

    def _stamp(self) -> dict[str, str]:
        headers = {HEADER_VM: self.vm, HEADER_LINK: self.kind.value, HEADER_HOST: self.host}
        if self._name:
            headers[HEADER_VM_NAME] = self._name
        return headers

    def headers(self) -> dict[str, str]:
        """The stamp on everything this link publishes (built once; nats-py only reads it)."""
        return self._headers

    def _admit(self) -> None:
        if not self.bucket.allow():
            self.metrics.drop("rate_limited")
            raise RemoteError(
                errors.RATE_LIMITED,
                f"too many frames from this VM (limit {self.limits.rate_limit:g}/s)",
            )

    async def forward(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method not in GUEST_RPCS:
            # Answer here: a guest asking for something no service offers is not a reason to
            # touch the bus, and "no responders" would wrongly suggest a service is down.
            self.metrics.drop("unknown_method")
            raise RemoteError(
                errors.UNKNOWN_METHOD,
                f"no guest RPC named {method!r} (known: {', '.join(sorted(GUEST_RPCS))})",
            )
        subject = rpc_subject(method)
        started = time.perf_counter()
        outcome = "ok"
        try:
            reply = await self.nc.request(
                subject,
                json.dumps(params).encode(),
                timeout=max(self.limits.rpc_timeout, SLOW_GUEST_RPCS.get(method, 0.0)),
                headers=self.headers(),
            )
        except NoRespondersError:
            outcome = "unavailable"
            raise RemoteError(
                errors.UNAVAILABLE, f"no service answers {subject} (is rpc-router running?)"
            ) from None
        except NatsTimeout:
            outcome = "timeout"
            raise RemoteError(errors.TIMEOUT, f"{subject} did not answer in time") from None
        finally:
            self.metrics.observe_rpc(_label(method), outcome, time.perf_counter() - started)
        err = BusError.from_reply(reply.headers, reply.data)
        if err is not None:
            raise RemoteError(err.code, err.message, err.details)
        try:
            result = json.loads(reply.data) if reply.data else {}
        except ValueError:
            raise RemoteError(errors.INTERNAL, f"{subject} answered with invalid JSON") from None
        return result if isinstance(result, dict) else {"result": result}

    async def guest_hello(self, params: dict[str, Any]) -> dict[str, Any]:
        self._admit()
        if self.hello_check is not None:
            await self.hello_check(params)
        await self._serve_commands()
        try:
            ack = await self.forward("hello", params)
        except BaseException:
            if not self.up:
                await self._stop_serving()
            raise
        await self._set_up()
        return ack

    async def guest_rpc(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._admit()
        return await self.forward(method, params)

    async def guest_event(self, method: str, params: dict[str, Any]) -> None:
        if not self.bucket.allow():
            self.metrics.drop("rate_limited")
            return
        try:
            await self.nc.publish(
                evt_subject(EVT_GUEST, self.vm),
                json.dumps({"method": method, "params": params}).encode(),
                headers=self.headers(),
            )
        except Exception as exc:  # a bus hiccup must not end the link
            log.warning("could not publish event from VM %s: %s", self.vm, exc)

    # --- host → guest ----------------------------------------------------------------------------

    async def _command_cb(self, msg: Msg) -> None:
        task = asyncio.ensure_future(self._command_msg(msg))
        self.commands.add(task)
        task.add_done_callback(self.commands.discard)

    async def _command_msg(self, msg: Msg) -> None:
        if not msg.reply:
            return
        method = msg.subject.rsplit(".", 1)[-1]
        headers = msg.headers or {}
        started = time.perf_counter()
        outcome = "ok"
        try:
            try:
                params = json.loads(msg.data) if msg.data else {}
            except ValueError:
                raise BusError(errors.BAD_REQUEST, "command parameters must be JSON") from None
            if not isinstance(params, dict):
                raise BusError(errors.BAD_REQUEST, "command parameters must be a JSON object")
            timeout = self.limits.command_timeout
            if HEADER_DEADLINE_MS in headers:
                try:
                    ms = int(headers[HEADER_DEADLINE_MS])
                except ValueError:
                    raise BusError(
                        errors.BAD_REQUEST, f"{HEADER_DEADLINE_MS} must be an integer"
                    ) from None
                timeout = min(MAX_COMMAND_TIMEOUT, max(0.01, ms / 1000))
            request_id = headers.get(HEADER_REQUEST_ID)
            if request_id is not None and not valid_id(request_id):
                raise BusError(
                    errors.BAD_REQUEST, f"{HEADER_REQUEST_ID} must be 1-64 chars of [A-Za-z0-9._:-]"
                )
            result = await self.command(method, params, timeout, request_id)
            await self.nc.publish(msg.reply, json.dumps(result).encode())
        except BusError as err:
            outcome = err.code
            await self.nc.publish(msg.reply, err.to_bytes(), headers=err.headers())
        except Exception as exc:
            outcome = errors.INTERNAL
            log.exception("command %s for VM %s failed", method, self.vm)
            failure = BusError(
                errors.INTERNAL, f"link terminator failed: {type(exc).__name__}", 500
            )
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, failure.to_bytes(), headers=failure.headers())
        finally:
            self.metrics.observe_command(_label(method), outcome, time.perf_counter() - started)

    async def command(
        self, method: str, params: dict[str, Any], timeout: float, request_id: str | None
    ) -> dict[str, Any]:
        """Run a command in the guest; typed BusError on failure."""
        if request_id is None:
            return await self._command(method, params, timeout, None)
        # A retry of a request whose first copy is still in flight (its caller gave up
        # early) waits for that copy's answer: the id must not be sent twice at once.
        running = self.inflight.get(request_id)
        if running is None:
            running = asyncio.ensure_future(self._command(method, params, timeout, request_id))
            self.inflight[request_id] = running
            running.add_done_callback(lambda fut: self._settled(request_id, fut))
        try:
            return await asyncio.wait_for(asyncio.shield(running), timeout)
        except asyncio.TimeoutError:
            raise BusError(
                errors.TIMEOUT, f"no answer to '{method}' before its deadline", 504
            ) from None

    def _settled(self, request_id: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        if self.inflight.get(request_id) is fut:
            del self.inflight[request_id]
        if not fut.cancelled():
            fut.exception()  # every waiter has it; do not report it as never retrieved

    async def _command(
        self, method: str, params: dict[str, Any], timeout: float, request_id: str | None
    ) -> dict[str, Any]:
        channel = self.channel
        if channel is None or not self.ready:
            raise BusError(
                errors.NO_ACTIVE_LINK,
                f"VM {self.vm} has no active {self.kind.value} link on {self.host} "
                "(agent not running or not yet connected)",
                status=503,
            )
        try:
            return await channel.request(method, params, timeout, request_id=request_id)
        except LinkClosed:
            raise BusError(
                errors.LINK_LOST,
                f"the {self.kind.value} link of VM {self.vm} closed mid-command",
                503,
            ) from None
        except RemoteError as exc:
            raise BusError(exc.code, exc.message, STATUS.get(exc.code, 502), exc.details) from None
