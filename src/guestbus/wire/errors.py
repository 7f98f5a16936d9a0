"""Stable error codes, shared by the serial wire and the bus.

Programs branch on these strings, so they never change meaning; new codes may be added.
A person reads the accompanying ``message`` instead.
"""

from typing import Tuple

BAD_REQUEST = "bad_request"  # malformed request: bad params, deadline or method name
UNKNOWN_METHOD = "unknown_method"  # the receiver serves no such method
NOT_ALLOWED = "not_allowed"  # the method exists but policy (e.g. the agent allow-list) forbids it
TIMEOUT = "timeout"  # no answer before the request's deadline
NO_ACTIVE_LINK = "no_active_link"  # the host has no live link to that guest right now
HELLO_REQUIRED = "hello_required"  # the receiver has no handshake on this link: send hello first
UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # the hello named a protocol version we don't speak
IDENTITY_MISMATCH = "identity_mismatch"  # the hello's claimed identity differs from the link's
RATE_LIMITED = "rate_limited"  # too many requests; retry later
TOO_LARGE = "too_large"  # a request or its result does not fit in one frame
UNAVAILABLE = "unavailable"  # a dependency is down or the link is congested; retry later
INTERNAL = "internal"  # a bug on the answering side; the message says where
LINK_LOST = "link_lost"  # the connection dropped while the request was in flight
BAD_SIGNATURE = "bad_signature"  # a signed change is unsigned, mis-signed or has no key to check
STALE = "stale"  # a signed change expired, is not yet valid, or is older than one already applied
FROZEN = "frozen"  # the guest's file systems are frozen (or being frozen) already

ALL_CODES: Tuple[str, ...] = (
    BAD_REQUEST,
    UNKNOWN_METHOD,
    NOT_ALLOWED,
    TIMEOUT,
    NO_ACTIVE_LINK,
    HELLO_REQUIRED,
    UNSUPPORTED_PROTOCOL,
    IDENTITY_MISMATCH,
    RATE_LIMITED,
    TOO_LARGE,
    UNAVAILABLE,
    INTERNAL,
    LINK_LOST,
    BAD_SIGNATURE,
    STALE,
    FROZEN,
)
