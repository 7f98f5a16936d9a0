"""The IP-less link under test: a real nats-server, rpc-router, serial-bridge and lab fleet.

Nothing here is mocked: the broker is a real ``nats-server`` (one per test module, so the
registry holds exactly what the module created), the serial-bridge runs either in-process
(:class:`ServiceHost`) or as its own process (``python -m guestbus_serial_bridge.main``,
configured only by ``GUESTBUS_*`` environment variables, which is what an operator runs),
and the lab VMs are unix sockets relayed to real ptys with real agents on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from guestbus.broker import EmbeddedBroker
from guestbus.contract import (
    HEADER_DEADLINE_MS,
    HEADER_REQUEST_ID,
    KV_VMS,
    LinkEvent,
    VmEvent,
    VmRecord,
)
from guestbus.lab.fleet import LabAgent, LabFleet
from guestbus.lab.hypervisor import LabVM
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusError, ServiceHost
from guestbus.wire import ErrorReceived, FrameDecoder, ResponseReceived, Session
from guestbus_agent.commands import Commands
from guestbus_rpc_router.service import RouterSettings, RpcRouter
from guestbus_serial_bridge.service import SerialBridge
from guestbus_serial_bridge.settings import BridgeSettings

from ..support.probes import Samples, free_port, scrape
from ..support.process import AsyncServiceProcess
from ..support.waiting import wait_until

BRIDGE_HOST = "lab-host-1"
StackFactory = Callable[..., Awaitable["LinkStack"]]
"""The ``make_stack`` fixture: ``await make_stack(**LinkStack options)``."""
SOCKET_NAME = "{uuid}.serial.1"


# --- host → guest commands ------------------------------------------------------------------


@dataclass
class Reply:
    """What a ``gb.guest.<vm>.<method>`` request got: a result or a typed error."""

    result: dict[str, Any] | None
    error: BusError | None
    elapsed: float
    headers: dict[str, str]

    @property
    def code(self) -> str | None:
        return self.error.code if self.error is not None else None

    def ok(self) -> dict[str, Any]:
        assert self.error is None, f"expected a result, got {self.error!r}"
        assert self.result is not None
        return self.result


async def command(
    nc: Client,
    vm: str,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    request_id: str | None = None,
    deadline_ms: int | None = None,
    timeout: float = 5.0,
) -> Reply:
    """A host → guest command as any bus client sends it. Transport errors (no responders,
    NATS timeout) propagate; typed errors come back in :attr:`Reply.error`."""
    headers: dict[str, str] = {}
    if request_id is not None:
        headers[HEADER_REQUEST_ID] = request_id
    if deadline_ms is not None:
        headers[HEADER_DEADLINE_MS] = str(deadline_ms)
    started = time.monotonic()
    msg = await nc.request(
        f"gb.guest.{vm}.{method}",
        json.dumps(params or {}).encode(),
        timeout=timeout,
        headers=headers or None,
    )
    elapsed = time.monotonic() - started
    reply_headers = dict(msg.headers or {})
    error = BusError.from_reply(reply_headers, msg.data)
    result = None if error is not None else json.loads(msg.data)
    return Reply(result, error, elapsed, reply_headers)


class CommandCounter:
    """Counts how often one agent really runs ``method`` (wraps the real handler in the
    agent's command table); with :attr:`gate` cleared, runs block until it is set."""

    def __init__(self, agent: LabAgent, method: str) -> None:
        assert agent.link is not None, "only in-process lab agents have a command table"
        commands: Commands = agent.link.commands
        original = commands._table[method]
        self.calls = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

        async def counted(params: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            self.started.set()
            await self.gate.wait()
            return await original(params)

        commands._table[method] = counted


# --- events ---------------------------------------------------------------------------------


@dataclass
class Seen:
    subject: str
    data: dict[str, Any]
    at: float


class EventLog:
    """Everything published on ``gb.evt.>`` since :meth:`start`, in arrival order."""

    def __init__(self) -> None:
        self.events: list[Seen] = []
        self._sub: Subscription | None = None

    async def start(self, nc: Client) -> None:
        async def on_msg(msg: Msg) -> None:
            with contextlib.suppress(ValueError):
                self.events.append(Seen(msg.subject, json.loads(msg.data), time.monotonic()))

        self._sub = await nc.subscribe("gb.evt.>", cb=on_msg)
        await nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def mark(self) -> int:
        return len(self.events)

    def link_events(self, vm: str, since: int = 0) -> list[LinkEvent]:
        return [
            LinkEvent.model_validate(e.data)
            for e in self.events[since:]
            if e.subject == f"gb.evt.link.{vm}"
        ]

    def vm_events(self, vm: str, since: int = 0) -> list[VmEvent]:
        return [
            VmEvent.model_validate(e.data)
            for e in self.events[since:]
            if e.subject == f"gb.evt.vm.{vm}"
        ]

    def on(self, subject: str, since: int = 0) -> list[Seen]:
        return [e for e in self.events[since:] if e.subject == subject]


# --- the serial-bridge, in-process or as a process -----------------------------------------


@dataclass
class BridgeConfig:
    sockets: Path
    host: str = BRIDGE_HOST
    scan_interval: float = 0.5
    rate_limit: float = 50.0
    rate_burst: int = 200
    xml_dirs: tuple[Path, ...] = ()
    """libvirt domain XML directories (names of VMs); none by default."""

    def env(self, nats_url: str) -> dict[str, str]:
        return {
            "GUESTBUS_NATS_URL": nats_url,
            "GUESTBUS_SOCKET_PATTERN": str(self.sockets / SOCKET_NAME),
            "GUESTBUS_LIBVIRT_XML_DIRS": ",".join(str(d) for d in self.xml_dirs),
            "GUESTBUS_SCAN_INTERVAL": str(self.scan_interval),
            "GUESTBUS_BRIDGE_HOST": self.host,
            "GUESTBUS_RATE_LIMIT": str(self.rate_limit),
            "GUESTBUS_RATE_BURST": str(self.rate_burst),
            "GUESTBUS_LOG_LEVEL": "INFO",
        }

    def settings(self, nats_url: str, http_port: int) -> BridgeSettings:
        return BridgeSettings(
            nats_url=nats_url,
            http_host="127.0.0.1",
            http_port=http_port,
            socket_pattern=str(self.sockets / SOCKET_NAME),
            libvirt_xml_dirs=[str(d) for d in self.xml_dirs],
            scan_interval=self.scan_interval,
            bridge_host=self.host,
            rate_limit=self.rate_limit,
            rate_burst=self.rate_burst,
            shutdown_timeout=5.0,
        )


class BridgeInProcess:
    """The same service on :class:`ServiceHost` in the test's event loop."""

    def __init__(self, config: BridgeConfig, nats_url: str) -> None:
        self.config = config
        self.http_port = free_port()
        self.service = SerialBridge()
        self.host = ServiceHost(self.service, config.settings(nats_url, self.http_port))

    @property
    def alive(self) -> bool:
        return self.host.ready

    def log_tail(self, chars: int = 0) -> str:
        return "(in-process bridge: see the captured log)"

    async def start(self) -> None:
        await self.host.start()

    async def stop(self) -> None:
        await self.host.stop()

    async def metrics(self) -> Samples:
        return await scrape(self.http_port)


# --- the whole stack ------------------------------------------------------------------------


@dataclass
class LinkStack:
    """broker + rpc-router (in-process) + serial-bridge + lab fleet, torn down in reverse."""

    workdir: Path
    bridge_mode: str = "process"
    heartbeat: float = 0.5
    down_grace: float = 30.0
    sweep_interval: float = 0.5
    bridge_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sockets = Path(tempfile.mkdtemp(prefix="gblink-"))  # short: sun_path is 108 bytes
        self.broker = EmbeddedBroker(self.workdir / "broker", port=0, monitor_port=None)
        self.config = BridgeConfig(self.sockets, **self.bridge_config)
        self.events = EventLog()
        self.nc: Client | None = None
        self.router_host: ServiceHost | None = None
        self.bridge_process: AsyncServiceProcess | None = None
        self.bridge_inproc: BridgeInProcess | None = None
        self.fleet = LabFleet(self.sockets, mode="pty", heartbeat=self.heartbeat)
        self._registry: Registry | None = None

    async def start(self) -> None:
        await self.broker.start()
        self.nc = await nats.connect(self.broker.url, name="link-tests", connect_timeout=5)
        await provision(self.nc.jetstream(), 1)
        self._registry = Registry(await self.nc.jetstream().key_value(KV_VMS))
        await self.events.start(self.nc)
        self.router_host = ServiceHost(
            RpcRouter(),
            RouterSettings(
                nats_url=self.broker.url,
                http_port=0,
                heartbeat_interval=self.heartbeat,
                down_grace=self.down_grace,
                sweep_interval=self.sweep_interval,
                tls_port=0,  # the serial link only: no TLS gateway (IP fallback) here
                shutdown_timeout=5.0,
            ),
        )
        await self.router_host.start()
        if self.bridge_mode == "process":
            self.bridge_process = AsyncServiceProcess(
                "serial-bridge",
                "guestbus_serial_bridge.main",
                self.config.env(self.broker.url),
                self.workdir,
            )
            self.bridge_process.start()
            await self.bridge_process.wait_ready()
        else:
            self.bridge_inproc = BridgeInProcess(self.config, self.broker.url)
            await self.bridge_inproc.start()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.fleet.close()
        if self.bridge_process is not None:
            with contextlib.suppress(Exception):
                await self.bridge_process.stop()
        if self.bridge_inproc is not None:
            with contextlib.suppress(Exception):
                await self.bridge_inproc.stop()
        if self.router_host is not None:
            with contextlib.suppress(Exception):
                await self.router_host.stop()
        await self.events.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        with contextlib.suppress(Exception):
            await self.broker.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)

    # --- accessors -----------------------------------------------------------------------

    @property
    def bus(self) -> Client:
        assert self.nc is not None
        return self.nc

    @property
    def registry(self) -> Registry:
        assert self._registry is not None
        return self._registry

    @property
    def router(self) -> RpcRouter:
        assert self.router_host is not None
        service = self.router_host.service
        assert isinstance(service, RpcRouter)
        return service

    @property
    def bridge(self) -> AsyncServiceProcess | BridgeInProcess:
        bridge = self.bridge_process or self.bridge_inproc
        assert bridge is not None
        return bridge

    def router_metric(self, name: str, **labels: str) -> float:
        assert self.router_host is not None
        value = self.router_host.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    async def records(self) -> dict[str, VmRecord]:
        records = await self.registry.all()
        by_uuid = {r.uuid: r for r in records}
        assert len(by_uuid) == len(records), "registry holds one VM twice"
        return by_uuid

    def agent_link(self, vm: str) -> Any:
        link = self.fleet.agents[vm].link
        assert link is not None
        return link

    def agents_detail(self) -> str:
        rows = []
        for uuid, agent in self.fleet.agents.items():
            st = agent.link.status if agent.link is not None else None
            rows.append(
                f"{uuid}: active={st.active if st else '?'} hellos={st.hellos if st else '?'} "
                f"ok={st.heartbeats_ok if st else '?'} failed={st.heartbeats_failed if st else '?'}"
            )
        return "\n".join(rows) + f"\nbridge log:\n{self.bridge.log_tail()}"

    async def wait_active(self, vms: Iterable[str], timeout: float = 20.0) -> None:
        wanted = list(vms)

        def all_active() -> bool:
            return all(self.agent_link(v).status.active for v in wanted)

        await wait_until(
            all_active, timeout, f"{len(wanted)} agent links active", 0.05, self.agents_detail
        )

    async def wait_registered(
        self, vms: Iterable[str], timeout: float = 20.0, link: str = "serial"
    ) -> dict[str, VmRecord]:
        wanted = set(vms)
        latest: dict[str, VmRecord] = {}

        async def registered() -> bool:
            nonlocal latest
            latest = await self.records()
            return all(v in latest and latest[v].link.value == link for v in wanted)

        await wait_until(
            registered,
            timeout,
            f"{len(wanted)} VMs registered with link {link}",
            0.1,
            lambda: "\n".join(
                f"{v}: {latest[v].link if v in latest else 'missing'}" for v in sorted(wanted)
            ),
        )
        return latest


def random_vm() -> str:
    return str(uuidlib.uuid4())


# --- a guest driven by hand ---------------------------------------------------------------


@dataclass
class Answer:
    ok: bool
    result: dict[str, Any] | None = None
    code: str | None = None
    message: str = ""


class HandGuest:
    """The guest side of a lab VM's serial port, driven by the test: raw bytes or wire
    frames from a guest-side :class:`Session`; every answer the host sends is collected."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.session = Session()
        self.answers: dict[str, Answer] = {}
        self.frames: list[dict[str, Any]] = []  # every frame the host sent, decoded
        self.stray: list[Any] = []
        self._decoder = FrameDecoder()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, vm: LabVM) -> HandGuest:
        reader, writer = await vm.open_guest()
        return cls(reader, writer)

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            self.frames.extend(f for f in self._decoder.feed(data) if isinstance(f, dict))
            for ev in self.session.receive_data(data):
                if isinstance(ev, ResponseReceived):
                    self.answers[ev.request_id] = Answer(True, result=ev.result)
                elif isinstance(ev, ErrorReceived):
                    self.answers[ev.request_id] = Answer(False, code=ev.code, message=ev.message)
                else:
                    self.stray.append(ev)

    def answer_to(self, rid: str) -> dict[str, Any] | None:
        """The host's answer frame to a request id, also for requests written as raw bytes."""
        return next((f for f in self.frames if f.get("id") == rid), None)

    def write(self, raw: bytes) -> None:
        self.writer.write(raw)

    def send(self, method: str, params: dict[str, Any], timeout: float = 10.0) -> str:
        rid, data = self.session.send_request(method, params, timeout)
        self.writer.write(data)
        return rid

    async def wait_answers(self, rids: Iterable[str], timeout: float = 10.0) -> list[Answer]:
        wanted = list(rids)
        await wait_until(
            lambda: all(r in self.answers for r in wanted),
            timeout,
            f"answers to {len(wanted)} requests ({len(self.answers)} answers so far)",
        )
        return [self.answers[r] for r in wanted]

    async def request(self, method: str, params: dict[str, Any], timeout: float = 10.0) -> Answer:
        rid = self.send(method, params, timeout)
        return (await self.wait_answers([rid], timeout))[0]

    async def hello(self, params: dict[str, Any] | None = None) -> Answer:
        base = {"protocol": 1, "agent_version": "0.0.0-hand", "capabilities": []}
        rid, data = self.session.send_hello({**base, **(params or {})}, 10.0)
        self.writer.write(data)
        return (await self.wait_answers([rid]))[0]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.writer.close()
