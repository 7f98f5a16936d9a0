"""Thin asyncio adapter over the sans-IO :class:`Session`: one per link, on either side.

The agent (serial device or TLS socket), the serial-bridge (QEMU's unix socket) and the TLS
gateway all run this same adapter; only the byte stream differs. Standard library only and
CPython 3.9+, because the agent carries it into guests.
"""

import asyncio
import logging
import sys
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Set, TypeVar

from . import errors
from .session import (
    DuplicateRequest,
    ErrorReceived,
    Event,
    EventReceived,
    FrameDropped,
    HandshakeComplete,
    HelloFailed,
    HelloReceived,
    RequestReceived,
    RequestTimedOut,
    ResponseReceived,
    Session,
)

log = logging.getLogger("guestbus.wire")

RequestHandler = Callable[[str, Dict[str, Any]], Awaitable[Dict[str, Any]]]
HelloHandler = Callable[[Dict[str, Any]], Awaitable[Dict[str, Any]]]
EventHandler = Callable[[str, Dict[str, Any]], Awaitable[None]]
DropHandler = Callable[[str], None]

DEFAULT_WRITE_LIMIT = 1 << 20

T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def _within(work: Awaitable[T], timeout: float) -> T:
        """``await work``, cancelled after ``timeout`` s with asyncio.TimeoutError; in the
        caller's task (``asyncio.wait_for`` would start a task of its own, per call)."""
        async with asyncio.timeout(timeout):
            return await work

else:

    async def _within(work: Awaitable[T], timeout: float) -> T:
        return await asyncio.wait_for(work, timeout)


class RemoteError(Exception):
    """A typed error, raised by handlers to answer with it and by requests that got one."""

    def __init__(self, code: str, message: str, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class LinkClosed(Exception):
    """The byte stream ended; pending requests fail with this."""


class Congested(RemoteError):
    """The peer is not reading: refusing to buffer more rather than blocking or growing."""

    def __init__(self, buffered: int) -> None:
        super().__init__(
            errors.UNAVAILABLE,
            f"link congested: {buffered} bytes not yet taken by the peer",
        )


class Channel:
    """Runs a Session over a StreamReader/StreamWriter pair.

    Incoming requests run as tasks, each bounded by the deadline the caller sent; replies
    (including the session's own automatic ones) are written without ever awaiting the
    peer, and a peer that stops reading gets :class:`Congested` instead of unbounded buffers.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Optional[Session] = None,
        *,
        on_request: Optional[RequestHandler] = None,
        on_hello: Optional[HelloHandler] = None,
        on_event: Optional[EventHandler] = None,
        on_drop: Optional[DropHandler] = None,
        on_handshake: Optional[Callable[[Dict[str, Any]], None]] = None,
        on_hello_required: Optional[Callable[[], None]] = None,
        read_chunk: int = 65536,
        write_limit: int = DEFAULT_WRITE_LIMIT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session if session is not None else Session()
        self.on_request = on_request
        self.on_hello = on_hello
        self.on_event = on_event
        self.on_drop = on_drop
        self.on_handshake = on_handshake
        self.on_hello_required = on_hello_required
        self.read_chunk = read_chunk
        self.write_limit = write_limit
        self._waiters: Dict[str, asyncio.Future[Dict[str, Any]]] = {}
        self._tasks: Set[asyncio.Task[None]] = set()
        self._closed = False
        self._running = False
        # The session's deadlines are served by one timer, armed for the soonest of them; it
        # is re-armed only when a request brings a sooner deadline, not on every request.
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0

    # --- sending -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not data or self._closed:
            return
        transport = self.writer.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        if buffered > self.write_limit:
            raise Congested(buffered)
        self.writer.write(data)

    def _flush_auto(self) -> None:
        try:
            self._write(self.session.data_to_send())
        except Congested:
            log.debug("dropping automatic reply: link congested")

    async def request(
        self,
        method: str,
        params: Dict[str, Any],
        timeout: float,
        request_id: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Send a request and wait for its result; raises RemoteError / LinkClosed."""
        if self._closed:
            raise LinkClosed("link closed")
        rid, data = self.session.send_request(method, params, timeout, request_id=request_id)
        return await self._await(rid, data)

    async def hello(self, params: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        if self._closed:
            raise LinkClosed("link closed")
        rid, data = self.session.send_hello(params, timeout)
        return await self._await(rid, data)

    async def _await(self, rid: str, data: bytes) -> Dict[str, Any]:
        fut: asyncio.Future[Dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            self._write(data)
            self._arm_timer()  # a new deadline may be sooner than the armed one
            return await fut
        finally:
            self._waiters.pop(rid, None)

    def send_event(self, method: str, params: Dict[str, Any]) -> None:
        self._write(self.session.send_event(method, params))

    # --- receiving -----------------------------------------------------------------------

    async def run(self) -> None:
        """Read until EOF or cancel; then fail every pending request with LinkClosed."""
        self._running = True
        self._arm_timer()
        try:
            while True:
                data = await self.reader.read(self.read_chunk)
                if not data:
                    break
                self._dispatch(self.session.receive_data(data))
                self._flush_auto()
        finally:
            self._running = False
            self._disarm_timer()
            self._closed = True
            self.session.connection_lost()
            for fut in list(self._waiters.values()):
                if not fut.done():
                    fut.set_exception(LinkClosed("link closed"))
            for task in list(self._tasks):
                task.cancel()

    def _arm_timer(self) -> None:
        """Make sure tick() runs at the session's next deadline, or within the hour when
        nothing is in flight (while :meth:`run` runs).

        A timer already armed for that time or an earlier one is left alone (when it fires
        it ticks and arms the timer for whatever is next), so sending a request costs no
        timer of its own unless its deadline is the soonest.
        """
        if not self._running:
            return
        deadline = self.session.next_deadline()
        now = time.monotonic()
        due = now + 3600.0 if deadline is None else min(deadline, now + 3600.0)
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - now), self._on_timer)

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._running:
            return
        self._dispatch(self.session.tick())
        self._arm_timer()

    def _dispatch(self, events: "list[Event]") -> None:
        for ev in events:
            if isinstance(ev, ResponseReceived):
                self._resolve(ev.request_id, result=ev.result)
            elif isinstance(ev, HandshakeComplete):
                if self.on_handshake is not None:
                    self.on_handshake(ev.result)
            elif isinstance(ev, ErrorReceived):
                if ev.code == errors.HELLO_REQUIRED and self.on_hello_required is not None:
                    self.on_hello_required()
                self._resolve(ev.request_id, error=RemoteError(ev.code, ev.message, ev.details))
            elif isinstance(ev, HelloFailed):
                pass  # the hello's own ErrorReceived resolves its waiter
            elif isinstance(ev, RequestTimedOut):
                self._resolve(
                    ev.request_id,
                    error=RemoteError(
                        errors.TIMEOUT, f"no answer to '{ev.method}' before its deadline"
                    ),
                )
            elif isinstance(ev, HelloReceived):
                self._spawn(self._serve_hello(ev))
            elif isinstance(ev, RequestReceived):
                self._spawn(self._serve(ev))
            elif isinstance(ev, EventReceived):
                if self.on_event is not None:
                    self._spawn(self.on_event(ev.method, ev.params))
            elif isinstance(ev, FrameDropped):
                if self.on_drop is not None:
                    self.on_drop(ev.reason)
            elif isinstance(ev, DuplicateRequest) and self.on_drop is not None:
                self.on_drop("duplicate")

    def _resolve(
        self,
        rid: str,
        result: Optional[Dict[str, Any]] = None,
        error: Optional[BaseException] = None,
    ) -> None:
        fut = self._waiters.get(rid)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result if result is not None else {})

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_hello(self, ev: HelloReceived) -> None:
        if self.on_hello is None:
            await self._answer(ev.request_id, ev.deadline, self._no_handler("hello"), "hello")
            return
        await self._answer(ev.request_id, ev.deadline, self.on_hello(ev.params), "hello")

    async def _serve(self, ev: RequestReceived) -> None:
        if self.on_request is None:
            await self._answer(ev.request_id, ev.deadline, self._no_handler(ev.method), ev.method)
            return
        await self._answer(
            ev.request_id, ev.deadline, self.on_request(ev.method, ev.params), ev.method
        )

    async def _no_handler(self, method: str) -> Dict[str, Any]:
        raise RemoteError(errors.UNKNOWN_METHOD, f"this side serves no '{method}'")

    async def _answer(
        self, rid: str, deadline: float, work: Awaitable[Dict[str, Any]], method: str
    ) -> None:
        remaining = deadline - time.monotonic()
        try:
            result = await _within(work, max(remaining, 0.001))
            data = self.session.send_response(rid, result)
        except RemoteError as exc:
            data = self.session.send_error(rid, exc.code, exc.message, exc.details)
        except asyncio.TimeoutError:
            data = self.session.send_error(
                rid, errors.TIMEOUT, f"'{method}' did not finish before its deadline"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not take the link down
            log.exception("handler for %r failed", method)
            data = self.session.send_error(
                rid, errors.INTERNAL, f"'{method}' failed: {type(exc).__name__}"
            )
        try:
            self._write(data)
        except Congested:
            log.warning("reply to %r dropped: link congested", method)

    async def close(self) -> None:
        self._closed = True
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (OSError, RuntimeError):
            pass
