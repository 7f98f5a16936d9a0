"""Certificates, the mTLS fallback and clones under test: a real stack, nothing mocked.

One :class:`TlsStack` per test module: its own ``nats-server`` (so the registry and the CA's
bucket hold exactly what the module made), the cert-authority and the rpc-router with its TLS
gateway in-process, the serial-bridge as its own process (so a test can stop it as an operator
or a crash would), and a lab fleet of VMs with real agents whose IP fallback points at the
gateway. Raw TLS clients (:class:`TlsClient`) speak the wire protocol to the gateway with
certificates the test chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import shutil
import ssl
import tempfile
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from guestbus import pki
from guestbus.broker import EmbeddedBroker
from guestbus.contract import (
    HEADER_DEADLINE_MS,
    HEADER_REQUEST_ID,
    KV_VMS,
    VmRecord,
    ca_subject,
)
from guestbus.lab.fleet import LabFleet
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusError, ServiceHost, check_reply
from guestbus.wire.aio import Channel, RemoteError
from guestbus_agent.agent import Agent
from guestbus_agent.identity import Identity
from guestbus_cert_authority.service import CertAuthority
from guestbus_cert_authority.settings import CaSettings
from guestbus_rpc_router.gateway import Gateway
from guestbus_rpc_router.service import RouterSettings, RpcRouter

from ..support.probes import free_port
from ..support.process import AsyncServiceProcess
from ..support.waiting import wait_until

TRUST_DOMAIN = "tls-tests.example"
GATEWAY_NAME = "gw-test"
BRIDGE_HOST = "tls-host-1"
PASSPHRASE = "tls tests passphrase"
SOCKET_NAME = "{uuid}.serial.1"
REFUSED = "guestbus_gateway_refused_total"
GATEWAY_LOGGER = "guestbus.rpc-router.gateway"


def new_vm() -> str:
    return str(uuidlib.uuid4())


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- certificates made by the test ----------------------------------------------------------


@dataclass
class ClientCert:
    """A client key and certificate (PEM) for a raw TLS client."""

    key_pem: bytes
    cert_pem: bytes
    serial: str = ""
    not_after: datetime.datetime | None = None

    def context(self, ca_pem: str, workdir: Path) -> ssl.SSLContext:
        return client_context(ca_pem, workdir, self)


def agent_files(identity: Identity) -> ClientCert:
    """An agent's current key and certificate, as a raw client would present them."""
    return ClientCert(identity.key_path.read_bytes(), identity.cert_path.read_bytes())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def foreign_ca_client_cert(vm: str, ca_common_name: str = "another CA") -> ClientCert:
    """A client certificate that looks exactly like a cluster one (CN, one SPIFFE URI SAN,
    clientAuth) but is signed by a CA of its own (named like the cluster CA, if asked)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name)])
    now = utcnow()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vm)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.spiffe_id(TRUST_DOMAIN, vm))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ClientCert(key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def client_context(ca_pem: str, workdir: Path, cert: ClientCert | None) -> ssl.SSLContext:
    """What an agent builds (``guestbus_agent.tls.client_context``), from the test's files."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        name = uuidlib.uuid4().hex
        cert_path, key_path = workdir / f"{name}.crt", workdir / f"{name}.key"
        cert_path.write_bytes(cert.cert_pem)
        key_path.write_bytes(cert.key_pem)
        key_path.chmod(0o600)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


# --- a raw TLS client speaking the wire protocol ------------------------------------------


class TlsClient:
    """One TLS connection to the gateway with a :class:`Channel` on it (the guest side)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.channel = Channel(reader, writer, on_request=self._serve)
        self.task = asyncio.ensure_future(self.channel.run())
        self._seq = 0
        self.served: list[str] = []

    async def _serve(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Host → guest commands: this client answers ``ping`` only."""
        self.served.append(method)
        if method != "ping":
            raise RemoteError("not_allowed", f"the raw test client serves no {method!r}")
        return {"pong": True, "by": "raw-tls-client"}

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> TlsClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"),
            timeout,
        )
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        """The server closed the connection (the channel read EOF or failed)."""
        return self.task.done()

    async def hello(self, vm: str | None, timeout: float = 5.0) -> dict[str, Any]:
        params: dict[str, Any] = {
            "protocol": 1,
            "agent_version": "0.0.0-tls-test",
            "capabilities": ["cmd:ping"],
            "hostname": "raw-tls-client",
        }
        if vm is not None:
            params["vm"] = vm
        return await self.channel.hello(params, timeout)

    async def heartbeat(self, vm: str | None, timeout: float = 5.0) -> dict[str, Any]:
        self._seq += 1
        params: dict[str, Any] = {"seq": self._seq}
        if vm is not None:
            params["vm"] = vm
        return await self.channel.request("heartbeat", params, timeout)

    async def close(self) -> None:
        await self.channel.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# --- the serial-bridge as its own process ---------------------------------------------------


def bridge_env(sockets: Path, nats_url: str) -> dict[str, str]:
    return {
        "GUESTBUS_NATS_URL": nats_url,
        "GUESTBUS_SOCKET_PATTERN": str(sockets / SOCKET_NAME),
        "GUESTBUS_LIBVIRT_XML_DIRS": "",
        "GUESTBUS_SCAN_INTERVAL": "0.3",
        "GUESTBUS_BRIDGE_HOST": BRIDGE_HOST,
        "GUESTBUS_SHUTDOWN_TIMEOUT": "5",
        "GUESTBUS_LOG_LEVEL": "INFO",
    }


# --- the whole stack ------------------------------------------------------------------------


class TlsStack:
    """broker + cert-authority + rpc-router (TLS gateway) [+ serial-bridge process + lab fleet],
    torn down in reverse order by :meth:`close`."""

    def __init__(
        self,
        workdir: Path,
        *,
        vm_cert_lifetime: int = 3600,
        heartbeat: float = 0.3,
        serial_failure_limit: int = 3,
        request_timeout: float = 1.0,
        fleet_mode: str = "socketpair",
        bridge: bool = True,
        ca_concurrency: int = 64,
    ) -> None:
        self.workdir = workdir
        self.vm_cert_lifetime = vm_cert_lifetime
        self.heartbeat = heartbeat
        self.serial_failure_limit = serial_failure_limit
        self.request_timeout = request_timeout
        self.fleet_mode = fleet_mode
        self.with_bridge = bridge
        self.ca_concurrency = ca_concurrency
        # Short: a unix socket path must fit sun_path (108 bytes).
        self.sockets = Path(tempfile.mkdtemp(prefix="gbt-"))
        self.broker = EmbeddedBroker(workdir / "broker", port=0, monitor_port=None)
        self.nc: Client | None = None
        self.ca_host: ServiceHost | None = None
        self.router_host: ServiceHost | None = None
        self.bridge: AsyncServiceProcess | None = None
        self.fleet: LabFleet | None = None
        self._registry: Registry | None = None
        self.ca_pem = ""

    async def start(self) -> TlsStack:
        await self.broker.start()
        self.nc = await nats.connect(self.broker.url, name="tls-tests", connect_timeout=5)
        await provision(self.nc.jetstream(), 1)
        self._registry = Registry(await self.nc.jetstream().key_value(KV_VMS))
        self.ca_host = ServiceHost(
            CertAuthority(),
            CaSettings(
                nats_url=self.broker.url,
                http_port=0,
                state_dir=self.workdir / "ca",
                ca_passphrase=PASSPHRASE,
                vm_cert_lifetime=self.vm_cert_lifetime,
                trust_domain=TRUST_DOMAIN,
                ca_scan_interval=3600,
                ca_concurrency=self.ca_concurrency,
                shutdown_timeout=5,
                log_level="WARNING",
                event_loop="asyncio",
            ),
        )
        await self.ca_host.start()
        # Right after a fresh nats-server starts, a request can (rarely) find no responders
        # for a few milliseconds although the CA's subscriptions are registered: wait for it.
        info: dict[str, Any] = {}

        async def ca_answers() -> bool:
            nonlocal info
            try:
                info = await self.ca("info")
            except NoRespondersError:
                return False
            return True

        await wait_until(ca_answers, 10, "the cert-authority to answer gb.ca.info", 0.01)
        self.ca_pem = str(info["certificate"])
        self.router_host = ServiceHost(
            RpcRouter(),
            RouterSettings(
                nats_url=self.broker.url,
                http_port=0,
                heartbeat_interval=self.heartbeat,
                down_grace=30.0,
                sweep_interval=0.5,
                tls_port=free_port(),
                tls_host="127.0.0.1",
                gateway_name=GATEWAY_NAME,
                trust_domain=TRUST_DOMAIN,
                shutdown_timeout=5.0,
                event_loop="asyncio",
            ),
        )
        await self.router_host.start()
        await asyncio.wait_for(self.gateway.ready.wait(), 20)
        if self.with_bridge:
            self.bridge = AsyncServiceProcess(
                "serial-bridge",
                "guestbus_serial_bridge.main",
                bridge_env(self.sockets, self.broker.url),
                self.workdir,
            )
            self.bridge.start()
            await self.bridge.wait_ready()
        self.fleet = LabFleet(
            self.sockets,
            mode="socketpair" if self.fleet_mode == "socketpair" else "pty",
            heartbeat=self.heartbeat,
            gateway=("127.0.0.1", self.gateway_port),
            state_root=self.workdir / "guests",
            certificates=True,
            config_overrides={
                "serial_failure_limit": self.serial_failure_limit,
                "request_timeout": self.request_timeout,
            },
        )
        return self

    async def close(self) -> None:
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await self.fleet.close()
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                await self.bridge.stop()
        for host in (self.router_host, self.ca_host):
            if host is not None:
                with contextlib.suppress(Exception):
                    await host.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        with contextlib.suppress(Exception):
            await self.broker.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)

    # --- accessors ---------------------------------------------------------------------------

    @property
    def bus(self) -> Client:
        assert self.nc is not None
        return self.nc

    @property
    def lab(self) -> LabFleet:
        assert self.fleet is not None
        return self.fleet

    @property
    def router(self) -> RpcRouter:
        assert self.router_host is not None
        service = self.router_host.service
        assert isinstance(service, RpcRouter)
        return service

    @property
    def gateway(self) -> Gateway:
        gateway = self.router.gateway
        assert gateway is not None
        return gateway

    @property
    def gateway_port(self) -> int:
        assert self.gateway.port is not None
        return self.gateway.port

    @property
    def registry(self) -> Registry:
        assert self._registry is not None
        return self._registry

    def agent(self, vm: str) -> Agent:
        agent = self.lab.agents[vm].agent
        assert agent is not None
        return agent

    def router_metric(self, name: str, **labels: str) -> float:
        assert self.router_host is not None
        value = self.router_host.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def refused(self, reason: str) -> float:
        return self.router_metric(REFUSED, reason=reason)

    # --- the CA, as a trusted caller on the bus ---------------------------------------------

    async def ca(self, endpoint: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Request ``gb.ca.<endpoint>``; the decoded reply, or a raised BusError."""
        msg = await self.bus.request(
            ca_subject(endpoint), json.dumps(payload or {}).encode(), timeout=10
        )
        result: dict[str, Any] = json.loads(check_reply(msg.headers, msg.data))
        return result

    async def issue(self, vm: str, lifetime: int | None = None) -> ClientCert:
        key = ec.generate_private_key(ec.SECP256R1())
        body: dict[str, Any] = {"csr": pki.make_csr(key, vm).decode(), "vm": vm}
        if lifetime is not None:
            body["lifetime_seconds"] = lifetime
        reply = await self.ca("issue", body)
        return ClientCert(
            key_pem(key),
            str(reply["certificate"]).encode(),
            serial=str(reply["serial"]),
            not_after=datetime.datetime.fromisoformat(str(reply["not_after"])),
        )

    async def revoke(self, serial: str) -> dict[str, Any]:
        return await self.ca("revoke", {"serial": serial, "reason": "keyCompromise"})

    async def record(self, serial: str) -> dict[str, Any]:
        reply = await self.ca("get", {"serial": serial})
        record: dict[str, Any] = reply["record"]
        return record

    def context(self, cert: ClientCert | None) -> ssl.SSLContext:
        return client_context(self.ca_pem, self.workdir / "client-certs", cert)

    async def connect(self, cert: ClientCert | None) -> TlsClient:
        return await TlsClient.connect(self.gateway_port, self.context(cert))

    # --- the registry ------------------------------------------------------------------------

    async def records(self) -> dict[str, VmRecord]:
        records = await self.registry.all()
        by_uuid = {r.uuid: r for r in records}
        assert len(by_uuid) == len(records), "registry holds one VM twice"
        return by_uuid

    async def wait_registered(
        self, vms: Iterable[str], link: str, host: str | None = None, timeout: float = 20.0
    ) -> dict[str, VmRecord]:
        wanted = set(vms)
        latest: dict[str, VmRecord] = {}

        async def registered() -> bool:
            nonlocal latest
            latest = await self.records()
            return all(
                v in latest
                and latest[v].link.value == link
                and (host is None or latest[v].host == host)
                for v in wanted
            )

        await wait_until(
            registered,
            timeout,
            f"{len(wanted)} VMs registered with link {link}" + (f" at {host}" if host else ""),
            0.1,
            lambda: "\n".join(
                f"{v}: {latest[v].link.value}@{latest[v].host}" if v in latest else f"{v}: missing"
                for v in sorted(wanted)
            ),
        )
        return latest

    def agents_detail(self) -> str:
        rows = []
        for uuid, lab_agent in self.lab.agents.items():
            agent = lab_agent.agent
            if agent is None:
                continue
            st = agent.serial.status
            rows.append(
                f"{uuid}: path={agent.path} serial_active={st.active} "
                f"failures={st.consecutive_failures} ip={'yes' if agent.ip else 'no'} "
                f"fallbacks={agent.fallbacks} renewals={agent.renewals} "
                f"enrollments={agent.enrollments}"
            )
        tail = self.bridge.log_tail(1500) if self.bridge is not None else ""
        return "\n".join(rows) + (f"\nbridge log:\n{tail}" if tail else "")

    async def wait_paths(self, vms: Iterable[str], path: str, timeout: float = 20.0) -> float:
        wanted = list(vms)
        return await wait_until(
            lambda: all(self.agent(v).path == path for v in wanted),
            timeout,
            f"{len(wanted)} agents on path {path}",
            0.05,
            self.agents_detail,
        )


async def attempt_refused(stack: TlsStack, cert: ClientCert | None, vm: str) -> str:
    """Connect and say hello; the gateway must refuse. Returns what the client saw."""
    try:
        client = await stack.connect(cert)
    except (ssl.SSLError, OSError) as exc:
        return f"handshake failed: {exc!r}"
    try:
        ack = await client.hello(vm, timeout=5.0)
    except Exception as exc:  # LinkClosed, RemoteError, SSL errors: all mean "refused"
        return f"hello failed: {exc!r}"
    finally:
        await client.close()
    raise AssertionError(f"the gateway accepted a client it must refuse: {ack}")


# --- host → guest commands ------------------------------------------------------------------


@dataclass
class Outcome:
    """What one ``gb.guest.<vm>.<method>`` request got: ``ok``, a typed error code, or the
    bus's own ``no_responders`` (no terminator holds the VM's link) / ``nats_timeout``."""

    vm: str
    kind: str
    elapsed: float
    result: dict[str, Any] | None = None
    message: str = ""
    started: float = 0.0
    """Event-loop time when it was sent."""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


async def host_command(
    nc: Client,
    vm: str,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    deadline_ms: int = 5000,
    timeout: float = 10.0,
    request_id: str | None = None,
) -> Outcome:
    """A host → guest command as ``guestbus`` sends it (deadline header, request id)."""
    headers = {HEADER_DEADLINE_MS: str(deadline_ms)}
    if request_id is not None:
        headers[HEADER_REQUEST_ID] = request_id
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        msg = await nc.request(
            f"gb.guest.{vm}.{method}",
            json.dumps(params or {}).encode(),
            timeout=timeout,
            headers=headers,
        )
    except NoRespondersError:
        return Outcome(vm, "no_responders", loop.time() - started, started=started)
    except NatsTimeoutError:
        return Outcome(vm, "nats_timeout", loop.time() - started, started=started)
    elapsed = loop.time() - started
    error = BusError.from_reply(msg.headers, msg.data)
    if error is not None:
        return Outcome(vm, error.code, elapsed, message=error.message, started=started)
    return Outcome(vm, "ok", elapsed, result=json.loads(msg.data), started=started)
