"""The host end of a guest's serial link, played by the test itself (no services).

It speaks the wire protocol with ``guestbus.wire.Session`` over QEMU's unix socket, as the
serial-bridge does, and answers the agent's RPCs the way rpc-router would (hello with the
identity of the socket, heartbeats, reports), so one test can see an agent installed at
first boot say hello and answer host commands.
"""

from __future__ import annotations

import datetime
import select
import socket
import time
from typing import Any

from guestbus.wire import (
    ErrorReceived,
    HelloReceived,
    RequestReceived,
    RequestTimedOut,
    ResponseReceived,
    Session,
)
from guestbus.wire.session import PROTOCOL_VERSION


class CallFailed(Exception):
    pass


class SerialPeer:
    def __init__(self, sock: socket.socket, vm: str, heartbeat_interval: float = 5.0) -> None:
        self.sock = sock
        self.vm = vm
        self.heartbeat_interval = heartbeat_interval
        self.session = Session()
        self.hellos: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.responses: dict[str, ResponseReceived] = {}
        self.failures: dict[str, str] = {}
        self.bytes_in = 0

    def _now(self) -> str:
        return datetime.datetime.now(datetime.timezone.utc).isoformat()

    def _answer(self, event: object) -> None:
        s = self.session
        if isinstance(event, HelloReceived):
            self.hellos.append(event.params)
            claimed = str(event.params.get("vm") or "")
            ack = {
                "vm": self.vm,
                "link": "serial",
                "host": "e2e-test",
                "protocol": PROTOCOL_VERSION,
                "identity_matches": claimed.lower() == self.vm,
                "heartbeat_interval": self.heartbeat_interval,
                "server_time": self._now(),
            }
            self.sock.sendall(s.send_response(event.request_id, ack))
        elif isinstance(event, RequestReceived):
            if event.method == "heartbeat":
                self.heartbeats += 1
                result = {"seq": event.params.get("seq", 0), "server_time": self._now()}
                self.sock.sendall(s.send_response(event.request_id, result))
            elif event.method == "report":
                self.reports.append(event.params)
                self.sock.sendall(s.send_response(event.request_id, {"accepted": True}))
            else:
                self.sock.sendall(
                    s.send_error(event.request_id, "not_implemented", "not in the e2e peer")
                )
        elif isinstance(event, ResponseReceived):
            self.responses[event.request_id] = event
        elif isinstance(event, ErrorReceived):
            self.failures[event.request_id] = f"{event.code}: {event.message}"
        elif isinstance(event, RequestTimedOut):
            self.failures[event.request_id] = "timed out"

    def pump(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` and answer it."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("QEMU closed the serial socket")
            self.bytes_in += len(data)
            for event in self.session.receive_data(data):
                self._answer(event)
        for event in self.session.tick():
            self._answer(event)
        queued = self.session.data_to_send()  # e.g. a replayed answer to a retried request
        if queued:
            self.sock.sendall(queued)

    def wait_for_hello(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.hellos:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no hello within {timeout:.0f}s ({self.bytes_in} bytes in)")
            self.pump(0.5)
        return self.hellos[0]

    def wait_for_heartbeats(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.heartbeats < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.heartbeats} heartbeats within {timeout:.0f}s")
            self.pump(0.5)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """A host → guest command over the link; its result."""
        rid, data = self.session.send_request(method, params or {}, timeout)
        self.sock.sendall(data)
        deadline = time.monotonic() + timeout
        while rid not in self.responses:
            if rid in self.failures:
                raise CallFailed(f"{method}: {self.failures.pop(rid)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {method} within {timeout:.0f}s")
            self.pump(0.2)
        return self.responses.pop(rid).result
