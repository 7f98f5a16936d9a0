"""The guestbus serial wire protocol, sans-IO: framing, messages and the session state machine.

Standard library only and CPython 3.9+: the guest agent carries this package into guests.
The protocol is specified in docs/wire-protocol.md.
"""

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
    MAX_FRAME,
    DecoderStats,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
)
from .messages import (
    ErrorMsg,
    EventMsg,
    Message,
    MessageError,
    RequestMsg,
    ResponseMsg,
    parse_message,
    valid_id,
    valid_method,
)
from .session import (
    DROP_REASONS,
    HELLO_METHOD,
    PROTOCOL_VERSION,
    TRANSITIONS,
    LocalProtocolError,
    Session,
    SessionState,
    SessionStats,
    Trigger,
)

__all__ = [
    "DROP_REASONS",
    "HELLO_METHOD",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "DecoderStats",
    "DuplicateRequest",
    "ErrorMsg",
    "ErrorReceived",
    "Event",
    "EventMsg",
    "EventReceived",
    "FrameDecoder",
    "FrameDropped",
    "FrameTooLarge",
    "HandshakeComplete",
    "HelloFailed",
    "HelloReceived",
    "LocalProtocolError",
    "Message",
    "MessageError",
    "PeerHelloRejected",
    "RequestMsg",
    "RequestReceived",
    "RequestTimedOut",
    "ResponseMsg",
    "ResponseReceived",
    "Session",
    "SessionState",
    "SessionStats",
    "Trigger",
    "encode_frame",
    "errors",
    "parse_message",
    "valid_id",
    "valid_method",
]
