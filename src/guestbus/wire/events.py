"""What the session tells its owner: plain frozen values, so they can be logged and compared.

Deadlines and round-trip times are in the session's clock (``time.monotonic`` by default),
never the peer's: the two ends of a serial line share no clock.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union


@dataclass(frozen=True)
class HelloReceived:
    """The peer wants a session; answer with send_response (accept) or send_error (refuse)."""

    request_id: str
    params: Dict[str, Any]
    deadline: float


@dataclass(frozen=True)
class HandshakeComplete:
    """Our hello got an ok answer; follows that answer's ResponseReceived."""

    result: Dict[str, Any]


@dataclass(frozen=True)
class HelloFailed:
    """Our hello was refused, timed out or lost with the link; follows its ordinary event."""

    code: str
    message: str


@dataclass(frozen=True)
class PeerHelloRejected:
    """The session refused the peer's hello by itself (bad protocol or malformed)."""

    request_id: str
    code: str
    message: str


@dataclass(frozen=True)
class RequestReceived:
    """A request to serve; answer exactly once with send_response or send_error."""

    request_id: str
    method: str
    params: Dict[str, Any]
    deadline: float


@dataclass(frozen=True)
class ResponseReceived:
    request_id: str
    method: str
    result: Dict[str, Any]
    rtt: float


@dataclass(frozen=True)
class ErrorReceived:
    request_id: str
    method: str
    code: str
    message: str
    details: Optional[Dict[str, Any]]


@dataclass(frozen=True)
class EventReceived:
    method: str
    params: Dict[str, Any]


@dataclass(frozen=True)
class RequestTimedOut:
    """No answer before the deadline; a late answer is dropped as ``unknown_response``."""

    request_id: str
    method: str


@dataclass(frozen=True)
class DuplicateRequest:
    """A retried request id: the handler must not run again.

    ``replayed`` means the cached answer is already queued in data_to_send; otherwise the
    first copy is still being served and its answer will serve both.
    """

    request_id: str
    replayed: bool


@dataclass(frozen=True)
class FrameDropped:
    """Input that was discarded; ``reason`` is a stable counter name, ``detail`` for logs."""

    reason: str
    detail: str


Event = Union[
    HelloReceived,
    HandshakeComplete,
    HelloFailed,
    PeerHelloRejected,
    RequestReceived,
    ResponseReceived,
    ErrorReceived,
    EventReceived,
    RequestTimedOut,
    DuplicateRequest,
    FrameDropped,
]
