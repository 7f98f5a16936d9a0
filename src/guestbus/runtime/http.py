"""A tiny HTTP/1.1 server for probes and metrics (stdlib asyncio only).

``GET /healthz`` — 200 while the process runs.
``GET /readyz``  — 200 when ready, else 503 with the reason as the body.
``GET /metrics`` — Prometheus text exposition of the service's registry.

Requests are bounded (head only, at most :data:`MAX_REQUEST_BYTES`, read within
:data:`READ_TIMEOUT` seconds); every response closes the connection. ``HEAD`` is accepted
wherever ``GET`` is. Anything else: 404 (unknown path) or 405 (other method).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0

ReadyCheck = Callable[[], tuple[bool, str]]
"""Returns ``(ready, reason)``; reason is shown in the 503 body."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"

log = logging.getLogger("guestbus.runtime.http")


class ProbeServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics``. ``port=0`` binds an ephemeral port."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: ReadyCheck,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES
        )
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    def _route(self, method: str, path: str) -> tuple[int, str, bytes, dict[str, str]]:
        routes = ("/healthz", "/readyz", "/metrics")
        if path not in routes:
            return 404, _TEXT, b"not found\n", {}
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"}
        if path == "/healthz":
            return 200, _TEXT, b"ok\n", {}
        if path == "/readyz":
            ok, reason = self.ready()
            if ok:
                return 200, _TEXT, b"ready\n", {}
            return 503, _TEXT, f"not ready: {reason}\n".encode(), {}
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry), {}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        extra: dict[str, str]
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                status, ctype, body, extra = 431, _TEXT, b"request too large\n", {}
            except asyncio.TimeoutError:
                status, ctype, body, extra = 408, _TEXT, b"request timeout\n", {}
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            else:
                parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    status, ctype, body, extra = 400, _TEXT, b"bad request\n", {}
                else:
                    method = parts[0]
                    path = parts[1].split("?", 1)[0]
                    try:
                        status, ctype, body, extra = self._route(method, path)
                    except Exception:
                        log.exception("probe handler failed", extra={"path": path})
                        status, ctype, body, extra = 500, _TEXT, b"internal error\n", {}
            lines = [
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
                f"Content-Type: {ctype}",
                f"Content-Length: {len(body)}",
                "Connection: close",
                "Cache-Control: no-store",
                *(f"{k}: {v}" for k, v in extra.items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
