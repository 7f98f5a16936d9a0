"""The IP fallback: mutual TLS on TCP 2074, the same frames and subjects as the serial path.

The VM identity is the client certificate's one URI SAN (``spiffe://<td>/vm/<uuid>``), after
the chain verified against the cluster CA. Refused, each with its reason logged and counted:
no certificate, another CA, expired, revoked (per the CA's records in KV), a certificate that
does not name a VM, and one the CA has no record of. Behind the handshake runs the shared
:class:`guestbus.terminator.Terminator`, as in the serial-bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from prometheus_client import Counter, Gauge

from guestbus import pki
from guestbus.ca_client import ca_call
from guestbus.contract import (
    CA_INFO,
    CA_SERVER,
    CERTS_PREFIX_RECORD,
    EVT_CERT,
    KV_CERTS,
    CaInfo,
    CertAction,
    CertEvent,
    CertRecord,
    CertState,
    LinkKind,
    ServerCertReply,
    ServerCertRequest,
)
from guestbus.runtime import BusError, ServiceContext
from guestbus.terminator import LinkLimits, LinkMetrics, Terminator

log = logging.getLogger("guestbus.rpc-router.gateway")


class Refused(Exception):
    """A TLS client the gateway will not serve; the message is the logged reason."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reason_label(reason: str) -> str:
    text = reason.lower().replace("_", " ")  # OpenSSL reasons: PEER_DID_NOT_RETURN_A_…
    for needle, label in (
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("unknown ca", "foreign_ca"),
        ("unable to get local issuer", "foreign_ca"),
        ("signature failure", "foreign_ca"),  # another CA under the cluster CA's name
        ("self-signed", "foreign_ca"),
        ("self signed", "foreign_ca"),
        ("peer did not return a certificate", "no_certificate"),
        ("certificate required", "no_certificate"),
        ("uri san", "not_a_vm"),
        ("does not name a vm", "not_a_vm"),
        ("no record", "unknown_certificate"),
        ("timeout", "timeout"),
        ("taking longer than", "timeout"),  # the event loop's ssl_handshake_timeout
    ):
        if needle in text:
            return label
    return "handshake"


class Gateway:
    def __init__(self, ctx: ServiceContext, settings: Any) -> None:
        self.ctx = ctx
        self.settings = settings
        self.name: str = settings.gateway_name
        self.limits = LinkLimits(
            rpc_timeout=settings.gateway_rpc_timeout,
            command_timeout=settings.gateway_command_timeout,
            rate_limit=settings.gateway_rate_limit,
            rate_burst=settings.gateway_rate_burst,
        )
        self.metrics = LinkMetrics(ctx.registry, "guestbus_gateway")
        self.refused = Counter(
            "guestbus_gateway_refused_total",
            "TLS clients refused by the gateway, by reason.",
            ["reason"],
            registry=ctx.registry,
        )
        self.links_up = Gauge(
            "guestbus_gateway_links",
            "VM links held by this gateway by state.",
            ["state"],
            registry=ctx.registry,
        )
        self._vm_series: set[str] = set()
        self.vm_links = Gauge(
            "guestbus_gateway_vm_link_up",
            "1 for each VM whose IP (mTLS) link is up on this gateway.",
            ["vm"],
            registry=ctx.registry,
        )
        self.server_not_after = Gauge(
            "guestbus_gateway_certificate_expiry_timestamp_seconds",
            "When the gateway's server certificate expires (unix time).",
            registry=ctx.registry,
        )
        self.ssl_ctx: ssl.SSLContext | None = None
        self.listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.terminators: dict[str, Terminator] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.connections: dict[str, tuple[str, asyncio.StreamWriter]] = {}
        self.port: int | None = None
        self.ready = asyncio.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="guestbus-gateway-")
        self._kv: Any = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._kv = await self.ctx.js.key_value(KV_CERTS)
        await self.ctx.subscribe(f"gb.evt.{EVT_CERT}.*", self._on_cert_event)
        self.ctx.spawn(self._run(), name="tls-gateway")

    async def stop(self) -> None:
        accepting, self._accepting = self._accepting, None
        if accepting is not None:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
        if self.listener is not None:
            self.listener.close()
        for term in list(self.terminators.values()):
            await term.close("gateway stopping")
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=5)
        self._tmp.cleanup()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                not_after = await self._load_credentials()
                break
            except (BusError, OSError, ValueError, ssl.SSLError) as exc:
                log.warning("TLS gateway waiting for credentials: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        assert self.ssl_ctx is not None
        while True:
            try:
                self.listener = _listen(self.settings.tls_host, self.settings.tls_port)
                break
            except OSError as exc:
                log.error(
                    "TLS gateway cannot listen on %s:%s (%s); retrying (GUESTBUS_TLS_PORT)",
                    self.settings.tls_host,
                    self.settings.tls_port,
                    exc,
                )
                await asyncio.sleep(5)
        self.port = self.listener.getsockname()[1]
        self._accepting = asyncio.ensure_future(self._accept_forever(self.listener))
        log.info("TLS gateway listening", extra={"port": self.port, "gateway": self.name})
        self.ready.set()
        if self.settings.tls_cert_file:
            return  # operator-managed files: reloading them is the operator's job
        while True:
            # Renew the server certificate at 2/3 of its lifetime.
            assert not_after is not None
            now = datetime.datetime.now(datetime.UTC)
            wait = max(5.0, (not_after - now).total_seconds() * (1 / 3))
            await asyncio.sleep(wait)
            try:
                not_after = await self._load_credentials()
                log.info("gateway server certificate renewed", extra={"until": str(not_after)})
            except (BusError, OSError, ValueError, ssl.SSLError) as exc:
                log.warning("gateway certificate renewal failed: %s; retrying", exc)
                not_after = now + datetime.timedelta(seconds=90)

    async def _load_credentials(self) -> datetime.datetime | None:
        """Files if configured, else a server certificate from the cert-authority."""
        s = self.settings
        if s.tls_cert_file:
            ctx = self._context(Path(s.tls_cert_file), Path(s.tls_key_file), Path(s.tls_ca_file))
            self.ssl_ctx = ctx
            return None
        info = CaInfo.model_validate_json(await ca_call(self.ctx.nc, CA_INFO, b"{}"))
        key = pki.generate_key()
        dns = list(dict.fromkeys([*s.tls_dns, socket.gethostname(), "localhost"]))
        ips = list(dict.fromkeys([*s.tls_ips, "127.0.0.1"]))
        csr = pki.make_server_csr(key, dns, ips)
        request = ServerCertRequest(csr=csr.decode(), name=self.name, dns=dns, ips=ips)
        reply = ServerCertReply.model_validate_json(
            await ca_call(self.ctx.nc, CA_SERVER, request.model_dump_json().encode())
        )
        tmp = Path(self._tmp.name)
        (tmp / "server.crt").write_text(reply.certificate)
        key_path = tmp / "server.key"
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (tmp / "ca.pem").write_text(info.certificate)
        if self.ssl_ctx is None:
            self.ssl_ctx = self._context(tmp / "server.crt", key_path, tmp / "ca.pem")
        else:  # new connections use the new pair; live ones keep theirs
            self.ssl_ctx.load_cert_chain(str(tmp / "server.crt"), str(key_path))
        self.server_not_after.set(reply.not_after.timestamp())
        return reply.not_after

    @staticmethod
    def _context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    # --- connections -----------------------------------------------------------------------

    def _count_links(self) -> None:
        self.links_up.labels("up").set(sum(1 for t in self.terminators.values() if t.up))
        self.links_up.labels("connected").set(
            sum(1 for t in self.terminators.values() if t.connected)
        )
        up = {vm for vm, t in self.terminators.items() if t.up}
        for vm in self._vm_series - up:
            with contextlib.suppress(KeyError):
                self.vm_links.remove(vm)
        for vm in up:
            self.vm_links.labels(vm).set(1)
        self._vm_series = up

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: do not spin
                log.warning("TLS gateway accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            task = asyncio.ensure_future(self._handle(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handshake(
        self, conn: socket.socket
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """TLS server handshake on an accepted socket. Done by the event loop on the raw
        socket (not ``StreamWriter.start_tls``, which loses a ClientHello that arrived before
        the upgrade and then hangs), yet its failures are raised here, to be counted."""
        assert self.ssl_ctx is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, conn, ssl=self.ssl_ctx, ssl_handshake_timeout=10
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            peer = conn.getpeername()
        except OSError:
            peer = None
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await self._handshake(conn)
            vm, serial, not_after = await self._authenticate(writer)
        except (Refused, ssl.SSLError, OSError, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, Refused) else _reason(exc)
            self.refused.labels(_reason_label(reason)).inc()
            log.warning(
                "refused TLS client %s: %s",
                peer_text,
                reason,
                extra={"peer": peer_text, "reason": reason},
            )
            if writer is None:
                conn.close()
            else:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            return
        previous = self.connections.get(vm)
        if previous is not None:
            # The VM reconnected: the new connection wins.
            previous[1].close()
        self.connections[vm] = (serial, writer)
        term = self.terminators.get(vm)
        if term is None:
            term = Terminator(
                self.ctx.nc,
                vm,
                LinkKind.IP,
                self.name,
                metrics=self.metrics,
                limits=self.limits,
                on_change=self._count_links,
            )
            self.terminators[vm] = term
        lock = self.locks.setdefault(vm, asyncio.Lock())
        async with lock:  # one connection per VM: the replaced one finishes closing first
            await self._serve(vm, serial, not_after, term, reader, writer, peer_text)

    async def _serve(
        self,
        vm: str,
        serial: str,
        not_after: datetime.datetime,
        term: Terminator,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_text: str,
    ) -> None:
        if writer.is_closing():
            return
        remaining = (not_after - datetime.datetime.now(datetime.UTC)).total_seconds()
        expiry = asyncio.get_running_loop().call_later(max(0.0, remaining), writer.close)
        log.info(
            "TLS client %s is VM %s (certificate %s)",
            peer_text,
            vm,
            serial,
            extra={"vm": vm, "serial": serial, "peer": peer_text},
        )
        try:
            await term.serve(reader, writer)
        finally:
            expiry.cancel()
            if self.connections.get(vm, (None, None))[1] is writer:
                del self.connections[vm]
            self._count_links()

    async def _authenticate(
        self, writer: asyncio.StreamWriter
    ) -> tuple[str, str, datetime.datetime]:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise Refused("peer did not return a certificate")
        cert = x509.load_der_x509_certificate(der)
        try:
            vm = pki.vm_from_certificate(cert, self.settings.trust_domain)
        except pki.PkiError as exc:
            raise Refused(f"certificate does not name a VM: {exc}") from None
        serial = format(cert.serial_number, "x")
        try:
            entry = await self._kv.get(CERTS_PREFIX_RECORD + serial)
        except KeyNotFoundError:
            raise Refused(f"certificate {serial} has no record at the CA") from None
        record = CertRecord.model_validate_json(entry.value or b"{}")
        if record.state is CertState.REVOKED:
            reason = record.reason.value if record.reason else "unspecified"
            raise Refused(f"certificate {serial} of VM {vm} is revoked ({reason})")
        if record.vm != vm:
            raise Refused(f"certificate {serial} is recorded for another identity")
        return vm, serial, cert.not_valid_after_utc

    async def _on_cert_event(self, msg: Msg) -> None:
        """Revocation takes effect at once on a live connection too."""
        try:
            event = CertEvent.model_validate_json(msg.data)
        except ValueError:
            return
        if event.action is not CertAction.REVOKED or event.vm is None:
            return
        held = self.connections.get(event.vm)
        if held is not None and held[0] == event.serial:
            log.warning(
                "closing the IP link of VM %s: its certificate %s was revoked",
                event.vm,
                event.serial,
            )
            self.refused.labels("revoked").inc()
            held[1].close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.create_server((host, port), family=family, backlog=512)
    listener.setblocking(False)
    return listener


def default_ips() -> list[str]:
    ips: list[str] = []
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addr = str(info[4][0])
            with contextlib.suppress(ValueError):
                if not ipaddress.ip_address(addr).is_loopback:
                    ips.append(addr)
    return list(dict.fromkeys(ips))
