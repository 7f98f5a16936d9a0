"""The session state machine: handshake, request/response matching, deadlines, de-duplication.

Rules of this file (after h11's ``_state.py``):

* Everything that affects the session state lives in this one file. Framing
  (``framing.py``) and message shapes (``messages.py``) are checked elsewhere, but nothing
  outside this file reads or changes the state.
* The session does not know which side it plays. The agent in the guest and the host bridge
  run the same rules; either may send hello, requests and events, and either may restart.
* State changes only through ``TRANSITIONS``, one table keyed by (state, trigger). A pair
  missing from the table is a LocalProtocolError: local misuse. Triggers the peer can cause
  are in the table for every open state, so nothing the peer sends can raise.
* A send_* call either raises before changing anything, or changes state and returns the
  bytes, which the caller must then write.
* Sans-IO: bytes in, events out. Nothing reads a socket, sleeps or starts a thread; time
  comes only from the injected clock, and the owner calls tick() at next_deadline().
"""

import heapq
import itertools
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from . import errors
from .events import (
    DuplicateRequest,
    ErrorReceived,
    Event,
    EventReceived,
    FrameDropped,
    HandshakeComplete,
    HelloFailed,
    HelloReceived,
    PeerHelloRejected,
    RequestReceived,
    RequestTimedOut,
    ResponseReceived,
)
from .framing import (
    FRAME_DROP_REASONS,
    MAX_FRAME,
    DecoderStats,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
)
from .messages import (
    MAX_DEADLINE_MS,
    ErrorMsg,
    EventMsg,
    Message,
    MessageError,
    RequestMsg,
    ResponseMsg,
    parse_message,
    valid_id,
)

__all__ = [
    "DROP_REASONS",
    "HELLO_METHOD",
    "MIN_SESSION_FRAME",
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "DuplicateRequest",
    "ErrorReceived",
    "Event",
    "EventReceived",
    "FrameDropped",
    "FrameTooLarge",
    "HandshakeComplete",
    "HelloFailed",
    "HelloReceived",
    "LocalProtocolError",
    "PeerHelloRejected",
    "RequestReceived",
    "RequestTimedOut",
    "ResponseReceived",
    "Session",
    "SessionState",
    "SessionStats",
    "Trigger",
]

PROTOCOL_VERSION = 1
HELLO_METHOD = "hello"
# Room for the session's own error replies (64-char id, longest code) in any frame limit.
MIN_SESSION_FRAME = 512

# Drop reasons the session adds to the framing ones (stable: they name metrics).
BAD_MESSAGE = "bad_message"  # valid frame, but not a valid message
NOT_READY = "not_ready"  # request or event before the handshake
UNKNOWN_RESPONSE = "unknown_response"  # answer to an id not in flight (expired, or never sent)
DROP_REASONS: Tuple[str, ...] = (*FRAME_DROP_REASONS, BAD_MESSAGE, NOT_READY, UNKNOWN_RESPONSE)


class LocalProtocolError(Exception):
    """The caller misused the session (bad argument, illegal transition); nothing changed."""


class SessionState(Enum):
    IDLE = "IDLE"  # no handshake on this connection
    HELLO_SENT = "HELLO_SENT"  # our hello is in flight
    READY = "READY"  # handshake done: requests and events flow
    CLOSED = "CLOSED"  # the owner is done with this session


class Trigger(Enum):
    SEND_HELLO = "SEND_HELLO"  # we send a hello
    HELLO_ACCEPTED = "HELLO_ACCEPTED"  # ok response to our hello
    HELLO_REJECTED = "HELLO_REJECTED"  # error response to our hello, or it timed out
    ACCEPT_PEER_HELLO = "ACCEPT_PEER_HELLO"  # we sent an ok response to the peer's hello
    REJECT_PEER_HELLO = "REJECT_PEER_HELLO"  # we (or the session itself) refused the peer's hello
    PEER_LOST_STATE = "PEER_LOST_STATE"  # a request of this handshake got hello_required
    CONNECTION_LOST = "CONNECTION_LOST"  # the byte stream went away
    CLOSE = "CLOSE"


_S = SessionState
_T = Trigger

TRANSITIONS: Dict[Tuple[SessionState, Trigger], SessionState] = {
    (_S.IDLE, _T.SEND_HELLO): _S.HELLO_SENT,
    (_S.IDLE, _T.HELLO_ACCEPTED): _S.READY,  # our hello outlived a PEER_LOST_STATE
    (_S.IDLE, _T.HELLO_REJECTED): _S.IDLE,
    (_S.IDLE, _T.ACCEPT_PEER_HELLO): _S.READY,
    (_S.IDLE, _T.REJECT_PEER_HELLO): _S.IDLE,
    (_S.IDLE, _T.PEER_LOST_STATE): _S.IDLE,
    (_S.IDLE, _T.CONNECTION_LOST): _S.IDLE,
    (_S.IDLE, _T.CLOSE): _S.CLOSED,
    (_S.HELLO_SENT, _T.HELLO_ACCEPTED): _S.READY,
    (_S.HELLO_SENT, _T.HELLO_REJECTED): _S.IDLE,
    (_S.HELLO_SENT, _T.ACCEPT_PEER_HELLO): _S.READY,  # crossing hellos: both sides agree
    (_S.HELLO_SENT, _T.REJECT_PEER_HELLO): _S.HELLO_SENT,
    (_S.HELLO_SENT, _T.PEER_LOST_STATE): _S.HELLO_SENT,  # already re-handshaking
    (_S.HELLO_SENT, _T.CONNECTION_LOST): _S.IDLE,
    (_S.HELLO_SENT, _T.CLOSE): _S.CLOSED,
    (_S.READY, _T.SEND_HELLO): _S.HELLO_SENT,  # a serial line has no carrier: re-check the peer
    (_S.READY, _T.HELLO_ACCEPTED): _S.READY,  # our crossing hello answered
    (_S.READY, _T.HELLO_REJECTED): _S.IDLE,
    (_S.READY, _T.ACCEPT_PEER_HELLO): _S.READY,  # the peer restarted and said hello again
    (_S.READY, _T.REJECT_PEER_HELLO): _S.IDLE,
    (_S.READY, _T.PEER_LOST_STATE): _S.IDLE,  # e.g. the host bridge restarted
    (_S.READY, _T.CONNECTION_LOST): _S.IDLE,
    (_S.READY, _T.CLOSE): _S.CLOSED,
    (_S.CLOSED, _T.CONNECTION_LOST): _S.CLOSED,
    (_S.CLOSED, _T.CLOSE): _S.CLOSED,
}


@dataclass
class SessionStats(DecoderStats):
    frames_out: int = 0
    bytes_out: int = 0
    duplicates: int = 0  # retried requests answered from the dedup memory
    timeouts: int = 0  # our requests that expired unanswered
    auto_replies: int = 0  # frames the session wrote by itself (data_to_send)
    dropped: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


@dataclass
class _Pending:
    method: str
    params: Dict[str, Any]
    deadline: float
    sent_at: float
    epoch: int  # handshake the request was sent under; see PEER_LOST_STATE
    seq: int  # identity of its heap entry


@dataclass
class _Seen:
    touched: float
    answer: Optional[bytes] = None


class Session:
    """One end of a guestbus link. Feed it bytes, act on its events, write what it returns."""

    def __init__(
        self,
        *,
        max_frame: int = MAX_FRAME,
        clock: Callable[[], float] = time.monotonic,
        dedup_size: int = 4096,
        dedup_ttl: float = 600.0,
        id_prefix: Optional[str] = None,
    ) -> None:
        if max_frame < MIN_SESSION_FRAME:
            raise ValueError(f"max_frame must be at least {MIN_SESSION_FRAME}")
        if dedup_size < 0 or dedup_ttl < 0:
            raise ValueError("dedup_size and dedup_ttl must not be negative")
        if id_prefix is None:
            # Random per session: a restarted peer must not reuse ids the other side still
            # remembers, or it would get old cached answers.
            id_prefix = secrets.token_hex(4)
        elif len(id_prefix) > 40 or not valid_id(id_prefix):
            raise ValueError("id_prefix must be 1-40 chars of [A-Za-z0-9._:-]")
        self.max_frame = max_frame
        self._clock = clock
        self._dedup_size = dedup_size
        self._dedup_ttl = dedup_ttl
        self._prefix = id_prefix
        self._stats = SessionStats()
        self._decoder = FrameDecoder(max_frame, self._stats)
        self._state = SessionState.IDLE
        self._epoch = 0
        self._outbox = bytearray()
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._pending: Dict[str, _Pending] = {}
        self._heap: List[Tuple[float, int, str]] = []
        self._hello_id: Optional[str] = None
        self._peer_hellos: Set[str] = set()
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def stats(self) -> SessionStats:
        return self._stats

    def _check(self, trigger: Trigger) -> SessionState:
        try:
            return TRANSITIONS[(self._state, trigger)]
        except KeyError:
            raise LocalProtocolError(
                f"{trigger.name} is not allowed in state {self._state.name}"
            ) from None

    def _transition(self, trigger: Trigger) -> None:
        new = self._check(trigger)
        if new is SessionState.READY:
            self._epoch += 1
        self._state = new

    def _check_open(self) -> None:
        if self._state is SessionState.CLOSED:
            raise LocalProtocolError("the session is closed")

    # --- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> List[Event]:
        """Events for the bytes received; automatic replies go to data_to_send()."""
        if self._state is SessionState.CLOSED:
            return []
        now = self._clock()
        events: List[Event] = []
        for item in self._decoder.feed(data):
            if isinstance(item, FrameDropped):
                events.append(item)
            else:
                self._on_message(item, now, events)
        return events

    def data_to_send(self) -> bytes:
        """Bytes the session produced by itself (automatic and replayed replies)."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def _drop(self, reason: str, detail: str) -> FrameDropped:
        self._stats.dropped[reason] = self._stats.dropped.get(reason, 0) + 1
        return FrameDropped(reason, detail)

    def _on_message(self, obj: Dict[str, Any], now: float, events: List[Event]) -> None:
        try:
            msg = parse_message(obj)
        except MessageError as exc:
            events.append(self._drop(BAD_MESSAGE, exc.detail))
            if exc.request_id is not None:
                if exc.method == HELLO_METHOD:
                    self._reject_peer_hello(exc.request_id, errors.BAD_REQUEST, exc.detail, events)
                else:
                    self._auto_error(exc.request_id, errors.BAD_REQUEST, exc.detail)
            return
        if isinstance(msg, RequestMsg):
            self._on_request(msg, now, events)
        elif isinstance(msg, EventMsg):
            if self._state is SessionState.READY:
                events.append(EventReceived(msg.method, msg.params))
            else:
                events.append(self._drop(NOT_READY, f"event {msg.method!r} before hello"))
        else:
            self._on_answer(msg, now, events)

    def _on_request(self, msg: RequestMsg, now: float, events: List[Event]) -> None:
        deadline = now + msg.deadline_ms / 1000.0
        if msg.method == HELLO_METHOD:
            # Hellos bypass de-duplication: each one is a new handshake.
            protocol = msg.params.get("protocol")
            if isinstance(protocol, bool) or not isinstance(protocol, int):
                self._reject_peer_hello(
                    msg.id, errors.BAD_REQUEST, "hello params need an integer 'protocol'", events
                )
            elif protocol != PROTOCOL_VERSION:
                self._reject_peer_hello(
                    msg.id,
                    errors.UNSUPPORTED_PROTOCOL,
                    f"protocol {str(protocol)[:20]} is not supported; "
                    f"this side speaks {PROTOCOL_VERSION}",
                    events,
                    {"supported": [PROTOCOL_VERSION]},
                )
            else:
                self._peer_hellos.add(msg.id)
                events.append(HelloReceived(msg.id, msg.params, deadline))
            return
        if self._state is not SessionState.READY:
            events.append(self._drop(NOT_READY, f"request {msg.method!r} ({msg.id}) before hello"))
            self._auto_error(msg.id, errors.HELLO_REQUIRED, "no session on this link: hello first")
            return
        seen = self._recall(msg.id, now)
        if seen is not None:
            self._stats.duplicates += 1
            if seen.answer is not None:
                self._queue(seen.answer)
            events.append(DuplicateRequest(msg.id, seen.answer is not None))
            return
        self._remember(msg.id, now)
        events.append(RequestReceived(msg.id, msg.method, msg.params, deadline))

    def _on_answer(
        self, msg: Union[ResponseMsg, ErrorMsg], now: float, events: List[Event]
    ) -> None:
        pending = self._pending.pop(msg.id, None)
        if pending is None:
            events.append(
                self._drop(UNKNOWN_RESPONSE, f"answer for unknown or expired id {msg.id!r}")
            )
            return
        self._compact_heap()
        hello = msg.id == self._hello_id
        if hello:
            self._hello_id = None
        if isinstance(msg, ResponseMsg):
            events.append(
                ResponseReceived(msg.id, pending.method, msg.result, now - pending.sent_at)
            )
            if hello:
                self._transition(Trigger.HELLO_ACCEPTED)
                events.append(HandshakeComplete(msg.result))
            return
        events.append(ErrorReceived(msg.id, pending.method, msg.code, msg.message, msg.details))
        if hello:
            self._transition(Trigger.HELLO_REJECTED)
            events.append(HelloFailed(msg.code, msg.message))
        elif msg.code == errors.HELLO_REQUIRED and pending.epoch == self._epoch:
            # Only a request sent under the current handshake proves the peer forgot it; an
            # older one was answered before the peer's latest hello.
            self._transition(Trigger.PEER_LOST_STATE)

    def _reject_peer_hello(
        self,
        request_id: str,
        code: str,
        message: str,
        events: List[Event],
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        self._auto_error(request_id, code, message, details)
        self._peer_hellos.discard(request_id)
        self._transition(Trigger.REJECT_PEER_HELLO)
        events.append(PeerHelloRejected(request_id, code, message))

    def _auto_error(
        self, request_id: str, code: str, message: str, details: Optional[Dict[str, Any]] = None
    ) -> None:
        try:
            data = self._encode(ErrorMsg(request_id, code, message, details))
        except FrameTooLarge:  # cannot happen above MIN_SESSION_FRAME; keep the code anyway
            data = self._encode(ErrorMsg(request_id, code, ""))
        self._queue(data)

    def _queue(self, data: bytes) -> None:
        self._outbox += data
        self._stats.auto_replies += 1
        self._count_out(data)

    # --- de-duplication memory -----------------------------------------------------------

    def _prune(self, now: float) -> None:
        seen = self._seen
        while seen:
            first = next(iter(seen.values()))
            if len(seen) <= self._dedup_size and now - first.touched < self._dedup_ttl:
                break
            seen.popitem(last=False)

    def _recall(self, request_id: str, now: float) -> Optional[_Seen]:
        self._prune(now)
        seen = self._seen.get(request_id)
        if seen is not None:
            seen.touched = now
            self._seen.move_to_end(request_id)
        return seen

    def _remember(self, request_id: str, now: float) -> None:
        """After :meth:`_recall` pruned (as ``_on_request`` does): only the size can be over."""
        if self._dedup_size:
            self._seen[request_id] = _Seen(now)
            if len(self._seen) > self._dedup_size:
                self._seen.popitem(last=False)

    # --- sending -------------------------------------------------------------------------

    def _encode(self, msg: Message) -> bytes:
        try:
            return encode_frame(msg.to_dict(), self.max_frame)
        except FrameTooLarge:
            raise
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"not plain JSON: {exc}") from None

    def _count_out(self, data: bytes) -> None:
        self._stats.frames_out += 1
        self._stats.bytes_out += len(data)

    def send_hello(self, params: Dict[str, Any], timeout: float) -> Tuple[str, bytes]:
        """Start a handshake; ``protocol`` is added to params if absent."""
        self._check_open()
        self._check(Trigger.SEND_HELLO)
        if self._hello_id is not None:
            raise LocalProtocolError("a hello is already in flight")
        if not isinstance(params, dict):
            raise LocalProtocolError("params must be a dict")
        params = {"protocol": PROTOCOL_VERSION, **params}
        rid, data = self._send_request(HELLO_METHOD, params, timeout, None)
        self._hello_id = rid
        self._transition(Trigger.SEND_HELLO)
        return rid, data

    def send_request(
        self,
        method: str,
        params: Dict[str, Any],
        timeout: float,
        request_id: Optional[str] = None,
    ) -> Tuple[str, bytes]:
        """A request to write now; its answer or RequestTimedOut comes as an event.

        Allowed before READY, because readiness can change under the caller between checking
        and sending: the peer then answers ``hello_required``, which is an ordinary event.
        """
        self._check_open()
        if method == HELLO_METHOD:
            raise LocalProtocolError("use send_hello() for hello")
        return self._send_request(method, params, timeout, request_id)

    def _send_request(
        self, method: str, params: Dict[str, Any], timeout: float, request_id: Optional[str]
    ) -> Tuple[str, bytes]:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout * 1000 <= MAX_DEADLINE_MS
        ):
            raise LocalProtocolError(f"timeout must be > 0 and at most {MAX_DEADLINE_MS} ms")
        if request_id is None:
            rid = f"{self._prefix}-{next(self._ids)}"
            while rid in self._pending:
                rid = f"{self._prefix}-{next(self._ids)}"
        elif request_id in self._pending:
            raise LocalProtocolError(f"request id {request_id!r} is already in flight")
        else:
            rid = request_id
        try:
            msg = RequestMsg(rid, method, params, max(1, math.ceil(timeout * 1000)))
        except MessageError as exc:
            raise LocalProtocolError(exc.detail) from None
        data = self._encode(msg)
        now = self._clock()
        seq = next(self._seq)
        self._pending[rid] = _Pending(method, params, now + timeout, now, self._epoch, seq)
        heapq.heappush(self._heap, (now + timeout, seq, rid))
        self._count_out(data)
        return rid, data

    def send_response(self, request_id: str, result: Dict[str, Any]) -> bytes:
        """The answer to a RequestReceived or HelloReceived; sent even past its deadline."""
        self._check_open()
        try:
            msg = ResponseMsg(request_id, result)
        except MessageError as exc:
            raise LocalProtocolError(exc.detail) from None
        return self._send_answer(msg, Trigger.ACCEPT_PEER_HELLO)

    def send_error(
        self,
        request_id: str,
        code: str,
        message: str,
        details: Optional[Dict[str, Any]] = None,
    ) -> bytes:
        self._check_open()
        try:
            msg = ErrorMsg(request_id, code, message, details)
        except MessageError as exc:
            raise LocalProtocolError(exc.detail) from None
        return self._send_answer(msg, Trigger.REJECT_PEER_HELLO)

    def _send_answer(self, msg: Union[ResponseMsg, ErrorMsg], hello_trigger: Trigger) -> bytes:
        rid = msg.id
        hello = rid in self._peer_hellos
        seen = None if hello else self._seen.get(rid)
        if seen is not None and seen.answer is not None:
            raise LocalProtocolError(f"request {rid!r} was already answered")
        if hello:
            self._check(hello_trigger)
        data = self._encode(msg)
        if hello:
            self._peer_hellos.discard(rid)
            self._transition(hello_trigger)
        elif seen is not None:
            # Cached byte for byte: a retry gets exactly what the first copy got.
            seen.answer = data
            seen.touched = self._clock()
            self._seen.move_to_end(rid)
        self._count_out(data)
        return data

    def send_event(self, method: str, params: Dict[str, Any]) -> bytes:
        """A one-way message; a peer not READY drops it (``not_ready``)."""
        self._check_open()
        try:
            msg = EventMsg(method, params)
        except MessageError as exc:
            raise LocalProtocolError(exc.detail) from None
        data = self._encode(msg)
        self._count_out(data)
        return data

    def resend_pending(self) -> bytes:
        """Frames re-sending every pending request (not the hello) under its own id.

        For after a reconnect and a new handshake: the peer's de-duplication runs each one at
        most once and replays answers it already has. Each carries its remaining time.
        """
        self._check_open()
        now = self._clock()
        frames = []
        for rid, p in self._pending.items():
            remaining = p.deadline - now
            if rid == self._hello_id or remaining <= 0:
                continue
            ms = min(MAX_DEADLINE_MS, max(1, math.ceil(remaining * 1000)))
            frames.append(self._encode(RequestMsg(rid, p.method, p.params, ms)))
            p.sent_at = now
            p.epoch = self._epoch
        for data in frames:
            self._count_out(data)
        return b"".join(frames)

    # --- time ----------------------------------------------------------------------------

    def tick(self) -> List[Event]:
        """Expire requests past their deadline; call at (or after) next_deadline()."""
        if self._state is SessionState.CLOSED:
            return []
        now = self._clock()
        self._prune(now)
        events: List[Event] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, rid = heapq.heappop(heap)
            pending = self._pending.get(rid)
            if pending is None or pending.seq != seq:
                continue
            del self._pending[rid]
            self._stats.timeouts += 1
            events.append(RequestTimedOut(rid, pending.method))
            if rid == self._hello_id:
                self._hello_id = None
                self._transition(Trigger.HELLO_REJECTED)
                events.append(HelloFailed(errors.TIMEOUT, "no answer to hello before its deadline"))
        return events

    def next_deadline(self) -> Optional[float]:
        """When tick() has work next, in clock() time; None if nothing is in flight."""
        heap = self._heap
        while heap:
            deadline, seq, rid = heap[0]
            pending = self._pending.get(rid)
            if pending is not None and pending.seq == seq:
                return deadline
            heapq.heappop(heap)
        return None

    def _compact_heap(self) -> None:
        # Answered requests leave stale heap entries; rebuild before they outnumber live ones.
        if len(self._heap) > 2 * len(self._pending) + 64:
            self._heap = [(p.deadline, p.seq, rid) for rid, p in self._pending.items()]
            heapq.heapify(self._heap)

    def pending_count(self) -> int:
        return len(self._pending)

    # --- lifecycle -----------------------------------------------------------------------

    def connection_lost(self, fail_pending: bool = False) -> List[Event]:
        """The byte stream went away: back to IDLE, keeping the dedup memory.

        Pending requests stay in flight (their answers may still come after a reconnect,
        see resend_pending) unless ``fail_pending``, which ends each with ``link_lost``.
        The hello always fails: a handshake belongs to one connection. Unsent automatic
        replies are discarded with the connection they answered.
        """
        events: List[Event] = list(self._decoder.reset())
        self._outbox.clear()
        self._peer_hellos.clear()
        if self._hello_id is not None:
            rid, self._hello_id = self._hello_id, None
            del self._pending[rid]
            message = "link lost before the hello was answered"
            events.append(ErrorReceived(rid, HELLO_METHOD, errors.LINK_LOST, message, None))
            events.append(HelloFailed(errors.LINK_LOST, message))
        if fail_pending:
            for rid, pending in self._pending.items():
                events.append(
                    ErrorReceived(
                        rid, pending.method, errors.LINK_LOST, "link lost before an answer", None
                    )
                )
            self._pending.clear()
        self._compact_heap()
        self._transition(Trigger.CONNECTION_LOST)
        return events

    def close(self) -> None:
        """Done for good: forget everything; later input is ignored, sending is an error."""
        self._transition(Trigger.CLOSE)
        self._decoder.reset()
        self._outbox.clear()
        self._pending.clear()
        self._heap.clear()
        self._hello_id = None
        self._peer_hellos.clear()
        self._seen.clear()
