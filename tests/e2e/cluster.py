"""The host side of the e2e tier: a real nats-server and the guestbus services as processes.

Each service runs as ``python -m guestbus.runtime.launch <module>:main`` (how ``guestbus up``
starts them), configured only by ``GUESTBUS_*`` environment variables, as an operator runs
it on a libvirt host:

- ``cert-authority``, ``rpc-router`` (its TLS gateway off: the test guests have no network,
  so the serial link is their only one), ``iso-builder`` (ISOs written where the domains'
  CD-ROMs point);
- ``serial-bridge`` with the path pattern **off** and libvirt's own XML directories
  (:data:`LIBVIRT_XML_DIRS`): it finds the domains, their names and their sockets with no
  mapping written by hand. It can be stopped and started again (:meth:`ServiceProcess.stop`,
  :meth:`ServiceProcess.start`).

Every process has its own NATS user with the least-privilege permissions of
:mod:`guestbus.permissions`, as under ``guestbus up``, compose and the chart: each service
its own, the provisioning as ``provisioner``, the ``guestbus`` CLI as ``operator``. A
permission the real-guest paths need and the set lacks fails here (and every service log is
checked for permission violations when the cluster stops).

Everything the tests ask goes through the bus: the ``guestbus`` CLI (:meth:`Cluster.cli`,
``python -m guestbus.cli.main``) for what an operator types, and the registry KV and the
``GB_EVENTS`` stream read directly for waiting and for events, by the tests' own user
(:data:`OBSERVER`, which may do anything: it checks, it does not stand for a service).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from guestbus import permissions
from guestbus.broker import EmbeddedBroker
from guestbus.contract import KV_VMS, STREAM_EVENTS, LinkEvent, VmRecord
from guestbus.credentials import EmbeddedAuth
from guestbus.provision import provision
from guestbus.registry import Registry

from ..support.process import ServiceProcess

T = TypeVar("T")

LIBVIRT_XML_DIRS = ("/run/libvirt/qemu", "/etc/libvirt/qemu")
"""libvirt's live XML of running domains, and the persistent definitions."""
BRIDGE_HOST = "e2e-hypervisor"
SERVICES = ("cert-authority", "rpc-router", "iso-builder", "serial-bridge")
OBSERVER = "e2e-observer"
VIOLATION = "permissions violation"
"""What nats-server answers a forbidden publish or subscribe with (any case)."""


@contextlib.contextmanager
def observer_role() -> Any:
    """The tests' own NATS role, known to :mod:`guestbus.permissions` only while a cluster
    is made (the generated permission files must not see it)."""
    permissions.register(
        permissions.Role(
            OBSERVER,
            "the e2e tests: read events and the registry, call anything",
            permissions.pub(">") + permissions.sub(">"),
            service=False,
        )
    )
    try:
        yield
    finally:
        permissions.ROLES.pop(OBSERVER, None)


@dataclass(frozen=True)
class Event:
    seq: int
    subject: str
    data: dict[str, Any]


class Cluster:
    """nats-server + cert-authority + rpc-router + iso-builder + serial-bridge."""

    def __init__(
        self,
        workdir: Path,
        iso_dir: Path,
        wheel_cache: Path,
        bridge_env: dict[str, str] | None = None,
    ) -> None:
        self.bridge_env = dict(bridge_env or {})
        """Extra settings of the serial-bridge (e.g. its host adapter's restore TTL)."""
        self.workdir = workdir
        self.iso_dir = iso_dir
        self.wheel_cache = wheel_cache
        with observer_role():
            roles = [*SERVICES, permissions.PROVISIONER, permissions.OPERATOR, OBSERVER]
            self.auth = EmbeddedAuth.generate(roles)
            self.broker = EmbeddedBroker(
                workdir / "broker",
                port=0,
                monitor_port=None,
                config_text=self.auth.config_text(),
                env=self.auth.server_env(),
            )
        self.services: dict[str, ServiceProcess] = {}

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def bridge(self) -> ServiceProcess:
        return self.services["serial-bridge"]

    def _service(self, name: str, module: str, **env: str) -> ServiceProcess:
        common = {
            "GUESTBUS_NATS_URL": self.url,
            **self.auth.client_env(name),
            "GUESTBUS_STATE_DIR": str(self.workdir / name),
            "GUESTBUS_LOG_LEVEL": "INFO",
            "GUESTBUS_SHUTDOWN_TIMEOUT": "10",
        }
        service = ServiceProcess(name, module, {**common, **env}, self.workdir / "logs")
        self.services[name] = service
        return service

    def start(self) -> None:
        self.broker.start_sync()
        self.run(lambda nc: provision(nc.jetstream(), 1), role=permissions.PROVISIONER)
        self._service(
            "cert-authority",
            "guestbus_cert_authority.main",
            GUESTBUS_CA_PASSPHRASE=secrets.token_hex(16),
        )
        self._service("rpc-router", "guestbus_rpc_router.main", GUESTBUS_TLS_PORT="0")
        self._service(
            "iso-builder",
            "guestbus_iso_builder.main",
            GUESTBUS_ISO_OUTPUT_DIR=str(self.iso_dir),
            GUESTBUS_ISO_WHEEL_CACHE=str(self.wheel_cache),
            # the agents' IP fallback has nowhere to go (no network in the guests)
            GUESTBUS_ISO_GATEWAY_HOST="127.0.0.1",
        )
        self._service(
            "serial-bridge",
            "guestbus_serial_bridge.main",
            GUESTBUS_SOCKET_PATTERN="",
            GUESTBUS_LIBVIRT_XML_DIRS=",".join(LIBVIRT_XML_DIRS),
            GUESTBUS_SERIAL_PORT_INDEX="1",
            GUESTBUS_SCAN_INTERVAL="1",
            GUESTBUS_BRIDGE_HOST=BRIDGE_HOST,
            **self.bridge_env,
        )
        for service in self.services.values():
            service.start()
        for service in self.services.values():
            service.wait_ready()

    def close(self) -> None:
        for service in reversed(list(self.services.values())):
            with contextlib.suppress(Exception):
                service.stop()
        with contextlib.suppress(Exception):
            self.broker.stop_sync()

    def violations(self) -> list[str]:
        """Permission violations any service met (lines of their logs, every start's)."""
        found: list[str] = []
        for service in self.services.values():
            for log in sorted(service.logdir.glob(f"{service.name}-*.log")):
                text = log.read_text(errors="replace")
                found += [
                    f"{log.name}: {line}" for line in text.splitlines() if VIOLATION in line.lower()
                ]
        return found

    def logs_detail(self, lines: int = 30) -> str:
        return "\n".join(s.log_tail(lines) for s in self.services.values())

    # --- the bus ---------------------------------------------------------------------------

    def run(self, work: Callable[[Client], Awaitable[T]], role: str = OBSERVER) -> T:
        """``work(nc)`` on a fresh connection as ``role`` (the tests are synchronous)."""

        async def go() -> T:
            nc = await nats.connect(
                self.url,
                name=f"e2e-tests-{role}",
                connect_timeout=5,
                user=role,
                password=self.auth.passwords[role],
                inbox_prefix=permissions.inbox_prefix(role),
            )
            try:
                return await work(nc)
            finally:
                await nc.close()

        return asyncio.run(go())

    def records(self) -> dict[str, VmRecord]:
        async def work(nc: Client) -> list[VmRecord]:
            return await Registry(await nc.jetstream().key_value(KV_VMS)).all()

        return {r.uuid: r for r in self.run(work)}

    def event_seq(self) -> int:
        """The last sequence in ``GB_EVENTS``: events after it are "since now"."""

        async def work(nc: Client) -> int:
            info = await nc.jetstream().stream_info(STREAM_EVENTS)
            return int(info.state.last_seq)

        return self.run(work)

    def events(self, subject: str, since: int = 0) -> list[Event]:
        """Events on ``subject`` (wildcards allowed) stored after sequence ``since``."""

        async def work(nc: Client) -> list[Event]:
            js = nc.jetstream()
            found: list[Event] = []
            seq = since + 1
            while True:
                try:
                    msg = await js.get_msg(STREAM_EVENTS, seq=seq, subject=subject, next=True)
                except NotFoundError:
                    return found
                data = json.loads(msg.data or b"{}")
                found.append(Event(int(msg.seq or 0), str(msg.subject), data))
                seq = int(msg.seq or 0) + 1

        return self.run(work)

    def link_events(self, vm: str, since: int = 0) -> list[LinkEvent]:
        return [LinkEvent.model_validate(e.data) for e in self.events(f"gb.evt.link.{vm}", since)]

    # --- the CLI ---------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        """``guestbus ARGS`` against this cluster; its stdout. A failure shows its output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
        env["GUESTBUS_NATS_URL"] = self.url
        env.update(self.auth.client_env(permissions.OPERATOR))
        proc = subprocess.run(
            [sys.executable, "-m", "guestbus.cli.main", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"guestbus {' '.join(args)} exited {proc.returncode}:\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def cli_json(self, *args: str, timeout: float = 120.0) -> Any:
        return json.loads(self.cli(*args, timeout=timeout))


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
    interval: float = 1.0,
) -> T:
    """Poll ``check`` until it returns something truthy; that value. On timeout the failure
    names ``what`` and adds ``detail()`` (console and service log tails)."""
    started = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() - started > timeout:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)
