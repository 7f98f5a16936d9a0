"""Connecting to NATS the same way in every service.

:func:`connect` reconnects forever (including the first connection: a service may start
before its broker), logs each connection state change as a JSON log line, authenticates
with user/password or a credentials file, and keeps the ``guestbus_nats_connected`` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import BadSubscriptionError
from prometheus_client import CollectorRegistry, Gauge

from guestbus import permissions
from guestbus.runtime.settings import ServiceSettings

log = logging.getLogger("guestbus.runtime.nats")

RECONNECT_TIME_WAIT = 2
CONNECT_TIMEOUT = 5
DRAIN_TIMEOUT = 30

_gauges: weakref.WeakKeyDictionary[CollectorRegistry, Gauge] = weakref.WeakKeyDictionary()


def connected_gauge(registry: CollectorRegistry) -> Gauge:
    """The ``guestbus_nats_connected`` gauge of ``registry`` (created once per registry)."""
    gauge = _gauges.get(registry)
    if gauge is None:
        gauge = Gauge(
            "guestbus_nats_connected",
            "1 while the NATS connection is up, else 0.",
            registry=registry,
        )
        _gauges[registry] = gauge
    return gauge


def _server_of(nc: Client) -> str:
    url = nc.connected_url
    if url is None:
        return ""
    # never log credentials that may be embedded in the URL
    return f"{url.scheme}://{url.hostname}:{url.port}"


def connect_options(settings: ServiceSettings) -> dict[str, Any]:
    """Authentication and TLS options for ``nats.connect`` derived from ``settings``."""
    opts: dict[str, Any] = {}
    if settings.nats_user:
        opts["user"] = settings.nats_user
    if settings.nats_password is not None:
        opts["password"] = settings.nats_password.get_secret_value()
    if settings.nats_creds is not None:
        try:
            import nkeys  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "GUESTBUS_NATS_CREDS needs the 'nkeys' package (pip install nkeys)"
            ) from err
        opts["user_credentials"] = str(settings.nats_creds)
    if settings.nats_tls_ca is not None:
        opts["tls"] = ssl.create_default_context(cafile=str(settings.nats_tls_ca))
    return opts


async def connect(
    settings: ServiceSettings,
    name: str,
    *,
    registry: CollectorRegistry | None = None,
    max_reconnect_attempts: int = -1,
    on_closed: Callable[[], None] | None = None,
    inbox_prefix: str | None = None,
) -> Client:
    """Connect to ``settings.nats_url`` as connection ``name``.

    With the default ``max_reconnect_attempts=-1`` this retries forever, first connection
    included, so it returns only once connected (cancel it to give up). ``on_closed`` is
    called when the connection is closed for good (after a drain, or when nats-py gives up).
    Replies come to ``settings.nats_inbox_prefix``, else ``inbox_prefix``, else
    ``_INBOX.<name>``: the inbox the generated NATS permissions give the user of ``name``.
    """
    gauge = connected_gauge(registry) if registry is not None else None
    if gauge is not None:
        gauge.set(0)
    nc = Client()
    servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]

    async def on_disconnected() -> None:
        if gauge is not None:
            gauge.set(0)
        if nc.is_closed:  # a deliberate close/drain; on_conn_closed logs it
            return
        log.warning("NATS disconnected; reconnecting", extra={"nats_name": name})

    async def on_reconnected() -> None:
        if gauge is not None:
            gauge.set(1)
        log.info("NATS reconnected", extra={"nats_name": name, "server": _server_of(nc)})

    async def on_error(err: Exception) -> None:
        if not nc.is_connected and isinstance(err, (OSError, asyncio.TimeoutError)):
            log.warning(
                "cannot reach NATS (%s); retrying in %ss",
                err or type(err).__name__,
                RECONNECT_TIME_WAIT,
                extra={"nats_name": name, "error_type": type(err).__name__},
            )
            return
        log.error(
            "NATS error: %s",
            err or type(err).__name__,
            extra={"nats_name": name, "error_type": type(err).__name__},
        )

    async def on_conn_closed() -> None:
        if gauge is not None:
            gauge.set(0)
        log.info("NATS connection closed", extra={"nats_name": name})
        if on_closed is not None:
            on_closed()

    await nc.connect(
        servers=servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=RECONNECT_TIME_WAIT,
        connect_timeout=CONNECT_TIMEOUT,
        drain_timeout=DRAIN_TIMEOUT,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        error_cb=on_error,
        closed_cb=on_conn_closed,
        inbox_prefix=settings.nats_inbox_prefix or inbox_prefix or permissions.inbox_prefix(name),
        **connect_options(settings),
    )
    if gauge is not None:
        gauge.set(1)
    log.info("NATS connected", extra={"nats_name": name, "server": _server_of(nc)})
    return nc


__all__ = ["Client", "connect", "connect_options", "connected_gauge"]


async def flush_interest(nc: Client) -> None:
    """A round trip to the server *after* every queued command, subscriptions included.

    nats-py's ``flush()`` writes its PING straight to the socket while SUB commands can still
    wait in the client's pending buffer, so its PONG may return before the server knows the
    new subscriptions, and a request from another connection then meets "no responders".
    Writing the pending buffer first restores the order a caller expects.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush()


async def drain_subscription(sub: Subscription) -> None:
    """Stop intake on ``sub`` and wait until its callback handled every message the server
    routed to it.

    ``sub.drain()`` alone loses messages: it queues the UNSUB but its round trip's PING goes
    to the socket ahead of it (see :func:`flush_interest`), so the PONG can come back while
    the server still routes to the subscription; what arrives after the PONG finds the
    subscription gone and is dropped, and a request's caller waits out its whole timeout.
    The UNSUB and a round trip behind it go first here; ``drain()`` then finds nothing more
    on the way. A subscription already closed is left alone.
    """
    if sub._closed:
        return
    nc: Client = sub._conn
    await nc._send_unsubscribe(sub._id)
    await flush_interest(nc)
    with contextlib.suppress(BadSubscriptionError):
        await sub.drain()  # type: ignore[no-untyped-call]
