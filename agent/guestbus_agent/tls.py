"""The IP fallback transport: mutual TLS to the cluster's gateway (TCP 2074 by default)."""

import asyncio
import ssl
from typing import Tuple

from .identity import Identity
from .link import Opener


class TlsSetupError(OSError):
    """The client certificate, key or CA bundle cannot be used."""


def client_context(identity: Identity) -> ssl.SSLContext:
    if not identity.present():
        raise TlsSetupError(
            f"no client certificate in {identity.dir} yet (it comes from the ISO or an "
            "enrollment over serial)"
        )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(identity.ca_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(f"client certificate unusable: {exc}") from None
    return ctx


def tls_opener(host: str, port: int, identity: Identity, timeout: float = 10.0) -> Opener:
    """Connects with the current certificate each time (a renewal takes effect at once)."""

    async def open_tls() -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = client_context(identity)
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host),
                timeout=timeout,
            )
        except ssl.SSLError as exc:
            raise TlsSetupError(f"TLS handshake with {host}:{port} failed: {exc}") from None

    return open_tls
