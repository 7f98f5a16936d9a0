"""Calls to the cert-authority from other services (rpc-router: guest enrollment, renewal
and the gateway's server certificate; iso-builder: the certificates on ISOs), with its
absence turned into a typed, retryable error."""

from __future__ import annotations

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from guestbus.contract import ERROR_CA_UNAVAILABLE, ca_subject
from guestbus.runtime import BusError


async def ca_call(nc: Client, endpoint: str, body: bytes, timeout: float = 10.0) -> bytes:
    """``gb.ca.<endpoint>``: the reply body, or the BusError the CA (or its absence) gives."""
    try:
        msg = await nc.request(ca_subject(endpoint), body, timeout=timeout)
    except NoRespondersError:
        raise BusError(
            ERROR_CA_UNAVAILABLE, "no cert-authority is running; retry later", 503
        ) from None
    except NatsTimeout:
        raise BusError(
            ERROR_CA_UNAVAILABLE, "the cert-authority did not answer in time", 504
        ) from None
    err = BusError.from_reply(msg.headers, msg.data)
    if err is not None:
        raise err
    return msg.data
