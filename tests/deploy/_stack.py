"""Every service under its own NATS user, with the permission set a deployment uses.

:class:`SecureStack` runs a real ``nats-server`` with the configuration
:func:`guestbus.permissions.nats_conf` renders (passwords from the server's environment,
exactly as ``guestbus up``, compose and the chart do), provisions JetStream as the
``provisioner`` user, starts cert-authority, rpc-router (with its TLS gateway),
serial-bridge, iso-builder and dr-orchestrator in-process, each connected as its own user
with its own inbox prefix and serving ``/metrics`` on a real port, plus a lab fleet of VMs
with real agents. The test talks to it as the ``operator``. Nothing is mocked; the server's
log says whether anything was denied.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from guestbus import permissions
from guestbus.broker import EmbeddedBroker
from guestbus.contract import IsoInfo
from guestbus.lab.fleet import LabFleet
from guestbus.provision import provision
from guestbus.runtime import BusService, ServiceHost, ServiceSettings, check_reply
from guestbus_cert_authority.service import CertAuthority
from guestbus_cert_authority.settings import CaSettings
from guestbus_dr_orchestrator.service import DrOrchestrator
from guestbus_dr_orchestrator.settings import DrSettings
from guestbus_iso_builder.service import IsoBuilder
from guestbus_iso_builder.settings import IsoSettings
from guestbus_rpc_router.service import RouterSettings, RpcRouter
from guestbus_serial_bridge.service import SerialBridge
from guestbus_serial_bridge.settings import BridgeSettings

from ..support.probes import free_port, http_get
from ..support.waiting import wait_until

TRUST_DOMAIN = "deploy-tests.example"
BRIDGE_HOST = "deploy-host-1"
PASSPHRASE = "deploy tests passphrase"
DR_SUBNET = "10.0.0.0/16"
VIOLATION = "Violation"


class SecureStack:
    def __init__(self, workdir: Path, *, heartbeat: float = 0.3) -> None:
        self.workdir = workdir
        self.heartbeat = heartbeat
        self.sockets = Path(tempfile.mkdtemp(prefix="gbd-"))  # sun_path is short
        self.passwords = {name: permissions.generate_password() for name in permissions.ROLES}
        self.broker = EmbeddedBroker(
            workdir / "broker",
            port=0,
            monitor_port=None,
            config_text=permissions.nats_conf(),
            env={permissions.password_env(r): pw for r, pw in self.passwords.items()},
        )
        self.hosts: dict[str, ServiceHost] = {}
        self.http: dict[str, int] = {}
        self.fleet: LabFleet | None = None
        self.nc: Client | None = None
        self.client_errors: list[str] = []

    # --- clients ---------------------------------------------------------------------------

    async def client(self, role: str, errors: list[str] | None = None) -> Client:
        """A connection as ``role`` with that role's inbox; errors (permission violations
        included) are collected in ``errors``."""
        sink = self.client_errors if errors is None else errors

        async def on_error(err: Exception) -> None:
            sink.append(str(err))

        return await nats.connect(
            self.broker.url,
            user=role,
            password=self.passwords[role],
            inbox_prefix=permissions.inbox_prefix(role),
            name=f"deploy-tests-{role}",
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )

    @property
    def operator(self) -> Client:
        assert self.nc is not None
        return self.nc

    def creds(self, role: str) -> dict[str, Any]:
        return {"nats_user": role, "nats_password": self.passwords[role]}

    def log(self) -> str:
        return self.broker.log_path.read_text(errors="replace")

    def mark(self) -> int:
        """A position in the server's log; ``violations(since=mark)`` reads past it."""
        return len(self.log())

    def violations(self, since: int = 0) -> list[str]:
        return [line for line in self.log()[since:].splitlines() if VIOLATION in line]

    # --- lifecycle -------------------------------------------------------------------------

    def _common(self, name: str) -> dict[str, Any]:
        port = free_port()
        self.http[name] = port
        return {
            "nats_url": self.broker.url,
            "http_host": "127.0.0.1",
            "http_port": port,
            "state_dir": self.workdir / name,
            "shutdown_timeout": 5.0,
            "event_loop": "asyncio",
            "log_level": "WARNING",
            **self.creds(name),
        }

    async def _start(self, name: str, service: BusService, settings: ServiceSettings) -> None:
        host = ServiceHost(service, settings)
        await host.start()
        self.hosts[name] = host

    async def start(self) -> SecureStack:
        await self.broker.start()
        prov = await self.client(permissions.PROVISIONER)
        await provision(prov.jetstream(), 1)
        await prov.close()
        self.nc = await self.client(permissions.OPERATOR)

        await self._start(
            "cert-authority",
            CertAuthority(),
            CaSettings(
                **self._common("cert-authority"),
                ca_passphrase=PASSPHRASE,
                trust_domain=TRUST_DOMAIN,
                vm_cert_lifetime=3600,
                ca_scan_interval=3600,
            ),
        )
        await wait_until(self._answers("gb.ca.info"), 10, "the cert-authority")
        await self._start(
            "rpc-router",
            RpcRouter(),
            RouterSettings(
                **self._common("rpc-router"),
                heartbeat_interval=self.heartbeat,
                down_grace=30.0,
                sweep_interval=0.5,
                tls_port=free_port(),
                tls_host="127.0.0.1",
                gateway_name="gw-deploy",
                trust_domain=TRUST_DOMAIN,
            ),
        )
        gateway = self.router.gateway
        assert gateway is not None
        await asyncio.wait_for(gateway.ready.wait(), 20)
        await self.restart_bridge()
        await self._start(
            "iso-builder",
            IsoBuilder(),
            IsoSettings(
                **self._common("iso-builder"),
                iso_output_dir=self.workdir / "isos",
                iso_gateway_host="127.0.0.1",
                iso_gateway_port=gateway.port,
            ),
        )
        await self._start(
            "dr-orchestrator",
            DrOrchestrator(),
            DrSettings(
                **self._common("dr-orchestrator"),
                dr_instance="dr-deploy",
                dr_scan_interval=0.3,
                dr_link_poll=0.3,
            ),
        )
        # the agents verify DR changes with the key every ISO carries (iso-builder made it)
        info = IsoInfo.model_validate_json(check_reply(*(await self._reply("gb.iso.info"))))
        dr_key = self.workdir / "dr-verify.pem"
        dr_key.write_text(info.dr_public_key)
        self.fleet = LabFleet(
            self.sockets,
            mode="socketpair",
            heartbeat=self.heartbeat,
            gateway=("127.0.0.1", gateway.port or 0),
            state_root=self.workdir / "guests",
            certificates=True,
            config_overrides={"serial_failure_limit": 3, "request_timeout": 1.0},
            dr_key=dr_key,
            dr_subnet=DR_SUBNET,
        )
        return self

    async def _reply(self, subject: str) -> tuple[dict[str, str] | None, bytes]:
        msg = await self.operator.request(subject, b"{}", timeout=10)
        return msg.headers, msg.data

    def _answers(self, subject: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            try:
                await self.operator.request(subject, b"{}", timeout=2)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                return False
            return True

        return check

    async def restart_bridge(self) -> None:
        await self._start(
            "serial-bridge",
            SerialBridge(),
            BridgeSettings(
                **self._common("serial-bridge"),
                socket_pattern=str(self.sockets / "{uuid}.serial.1"),
                libvirt_xml_dirs=[],
                scan_interval=0.2,
                bridge_host=BRIDGE_HOST,
            ),
        )

    async def stop_service(self, name: str) -> None:
        host = self.hosts.pop(name)
        await host.stop()

    async def close(self) -> None:
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await self.fleet.close()
        for host in reversed(list(self.hosts.values())):
            with contextlib.suppress(Exception):
                await host.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        with contextlib.suppress(Exception):
            await self.broker.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)

    # --- accessors -------------------------------------------------------------------------

    @property
    def lab(self) -> LabFleet:
        assert self.fleet is not None
        return self.fleet

    @property
    def router(self) -> RpcRouter:
        service = self.hosts["rpc-router"].service
        assert isinstance(service, RpcRouter)
        return service

    async def scrape(self, name: str) -> str:
        status, raw = await http_get(self.http[name], "/metrics")
        body = raw.decode()
        assert status == 200, f"{name} /metrics answered {status}"
        return body


def exported_names(text: str) -> set[str]:
    """Every series name a ``/metrics`` text can hold: a histogram's ``_bucket``/``_count``/
    ``_sum``, a counter's ``_total``, including families that have no sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
        elif family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
    return names
