"""rpc-router: answers guest RPCs on ``gb.rpc.<method>`` and keeps the VM registry.

Stateless: every replica joins the ``rpc-router`` queue group and all state is in the
``gb_vms`` KV bucket, changed by compare-and-set. The VM a request is about is the one the
link terminator stamped in the ``GB-VM`` header, never one the guest names in its payload.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field, ValidationError, model_validator

from guestbus.ca_client import ca_call
from guestbus.contract import (
    CA_ISSUE,
    CA_RENEW,
    EVT_LINK,
    EVT_VM,
    HEADER_HOST,
    HEADER_LINK,
    HEADER_VM,
    HEADER_VM_NAME,
    KV_VMS,
    RPC_ENROLL,
    RPC_HEARTBEAT,
    RPC_HELLO,
    RPC_QUEUE,
    RPC_RENEW,
    RPC_REPORT,
    SSR_FORWARD,
    CertIssueRequest,
    GuestInfo,
    Heartbeat,
    HeartbeatAck,
    Hello,
    HelloAck,
    LinkEvent,
    LinkKind,
    LinkState,
    ReportAck,
    VmEvent,
    VmRecord,
    evt_subject,
    hv_subject,
    rpc_subject,
)
from guestbus.registry import Registry
from guestbus.runtime import (
    BusError,
    BusService,
    Handler,
    ServiceContext,
    ServiceSettings,
    parse_request,
)
from guestbus.runtime.metrics import Children
from guestbus.runtime.settings import CommaList
from guestbus.wire import PROTOCOL_VERSION, errors

from . import __version__
from .gateway import Gateway


class RouterSettings(ServiceSettings):
    heartbeat_interval: float = Field(
        default=5.0, gt=0, le=3600, description="Heartbeat interval suggested to agents (s)."
    )
    down_grace: float = Field(
        default=30.0, gt=0, description="A VM without heartbeat for this long is marked down (s)."
    )
    sweep_interval: float = Field(default=5.0, gt=0, description="How often to look (s).")
    heartbeat_record_interval: float = Field(
        default=1.0,
        ge=0,
        description="A VM's heartbeats are written to the registry at most this often (s); "
        "the ones in between are coalesced into the next write.",
    )
    tls_port: int = Field(
        default=2074, ge=0, le=65535, description="TLS gateway port (the IP fallback); 0: off."
    )
    tls_host: str = Field(default="0.0.0.0", description="Address the TLS gateway binds.")
    tls_dns: CommaList = Field(
        default_factory=list, description="Extra DNS names in the gateway's certificate."
    )
    tls_ips: CommaList = Field(
        default_factory=list, description="Extra IP addresses in the gateway's certificate."
    )
    tls_cert_file: str | None = Field(
        default=None, description="Server certificate file (else one from cert-authority)."
    )
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    gateway_name: str = Field(
        default_factory=lambda: (
            re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "gateway"
        ),
        description="Name of this gateway (certificate CN, GB-Host of its links).",
    )
    trust_domain: str = Field(default="guestbus.local", description="SPIFFE trust domain.")
    gateway_rpc_timeout: float = Field(default=5.0, gt=0)
    gateway_command_timeout: float = Field(default=10.0, gt=0)
    gateway_rate_limit: float = Field(default=50.0, gt=0)
    gateway_rate_burst: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _files_together(self) -> RouterSettings:
        files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(files) and not all(files):
            raise ValueError(
                "GUESTBUS_TLS_CERT_FILE, GUESTBUS_TLS_KEY_FILE and GUESTBUS_TLS_CA_FILE go "
                "together (or none: the gateway then asks the cert-authority)"
            )
        return self


@dataclass(frozen=True, slots=True)
class Stamp:
    """Who a guest RPC is from, as the link terminator says (read from headers on every
    guest RPC: a plain record, not a model)."""

    vm: str
    link: LinkKind
    host: str
    name: str | None = None


def stamp_of(request: Request) -> Stamp:
    headers = request.headers or {}
    vm = headers.get(HEADER_VM)
    link = headers.get(HEADER_LINK)
    host = headers.get(HEADER_HOST)
    if not vm or not link or not host:
        raise BusError(
            errors.BAD_REQUEST,
            f"guest RPCs must carry the {HEADER_VM}, {HEADER_LINK} and {HEADER_HOST} headers "
            "set by a link terminator (serial-bridge or TLS gateway)",
        )
    try:
        return Stamp(
            vm=vm.lower(), link=LinkKind(link), host=host, name=headers.get(HEADER_VM_NAME)
        )
    except ValueError:
        raise BusError(errors.BAD_REQUEST, f"bad link stamp: {HEADER_LINK}={link!r}") from None


class RpcRouter(BusService):
    name = "rpc-router"
    version = __version__
    description = "Guest-initiated RPCs (hello, heartbeat, report) and the VM registry."
    settings_cls = RouterSettings

    async def setup(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings_as(RouterSettings)
        self.registry = Registry(await ctx.js.key_value(KV_VMS))
        self._beats: dict[str, tuple[datetime, Stamp, Heartbeat]] = {}
        self._beat_tasks: set[asyncio.Task[None]] = set()
        self.refused = Counter(
            "guestbus_identity_refusals_total",
            "Guest payloads refused because they claimed another VM than the stamped one.",
            ["method"],
            registry=ctx.registry,
        )
        self.guest_rpcs = Children(
            Counter(
                "guestbus_guest_rpcs_total",
                "Guest-initiated RPCs handled, by method and link kind.",
                ["method", "link"],
                registry=ctx.registry,
            )
        )
        self.marked_down = Counter(
            "guestbus_vms_marked_down_total",
            "VMs marked down after their heartbeats stopped for the grace period.",
            registry=ctx.registry,
        )
        self.vms_by_link = Gauge(
            "guestbus_vms",
            "VMs in the registry by link kind (as last seen by this router's sweep).",
            ["link"],
            registry=ctx.registry,
        )
        endpoints: list[tuple[str, Handler, str, int]] = [
            (RPC_HELLO, self.hello,
             "First RPC on every link: registers the VM, returns the stamped identity.", 64),
            # 1: answered in the subscription's own task, in arrival order. A heartbeat
            # awaits nothing but its reply (the registry write runs behind it), so a task
            # per beat would cost more than the beat.
            (RPC_HEARTBEAT, self.heartbeat,
             "Periodic liveness; refreshes the VM's last heartbeat.", 1),
            (RPC_REPORT, self.report, "Guest info report (hostname, OS, kernel, interfaces).", 64),
            (RPC_ENROLL, self.enroll,
             "A guest's first certificate, or a clone's new identity (serial only).", 16),
            (RPC_RENEW, self.renew,
             "A guest renews its certificate (any link; expired: serial only).", 16),
        ]  # fmt: skip
        for method, op in SSR_FORWARD.items():
            endpoints.append((
                method, functools.partial(self.self_service, method),
                f"Self-service restore from inside a guest: forwarded to gb.hv.<its vm>.{op}.", 16,
            ))  # fmt: skip
        for method, handler, description, concurrency in endpoints:
            await ctx.add_endpoint(
                method,
                handler,
                subject=rpc_subject(method),
                description=description,
                queue_group=RPC_QUEUE,
                concurrency=concurrency,
            )
        await ctx.subscribe(f"gb.evt.{EVT_LINK}.*", self.on_link_event, queue=RPC_QUEUE)
        self.gateway: Gateway | None = None
        if self.settings.tls_port:
            self.gateway = Gateway(ctx, self.settings)
            await self.gateway.start()
        ctx.spawn(self.sweep_forever(), name="registry-sweep")

    async def teardown(self, ctx: ServiceContext) -> None:
        if self._beat_tasks:  # heartbeats already answered are recorded before we exit
            await asyncio.wait(set(self._beat_tasks), timeout=10)
        if self.gateway is not None:
            await self.gateway.stop()

    # --- handlers ------------------------------------------------------------------------

    def _refuse_claim(self, method: str, stamp: Stamp, claimed: str | None) -> None:
        if claimed is not None and claimed.lower() != stamp.vm:
            self.refused.labels(method).inc()
            self.ctx.log.warning(
                "refused %s: payload claims VM %s but the link is VM %s",
                method,
                claimed,
                stamp.vm,
                extra={"vm": stamp.vm, "claimed": claimed, "host": stamp.host},
            )
            self.ctx.spawn(
                self._publish(
                    evt_subject(EVT_VM, stamp.vm),
                    VmEvent(
                        vm=stamp.vm, kind="identity_refused", detail=f"{method} claimed {claimed}"
                    ),
                )
            )
            raise BusError(
                errors.IDENTITY_MISMATCH,
                f"this link belongs to VM {stamp.vm}; the payload claims {claimed}",
                status=403,
            )

    async def hello(self, request: Request) -> bytes:
        stamp = stamp_of(request)
        hello = parse_request(Hello, request.data)
        if stamp.link is LinkKind.IP and hello.vm is not None and hello.vm != stamp.vm:
            # Over IP the certificate is the identity: a different claim is not a clone
            # (clones re-enroll over serial), it is a VM pretending to be another.
            self._refuse_claim(RPC_HELLO, stamp, hello.vm)
        now = datetime.now(UTC)

        def update(rec: VmRecord) -> VmRecord:
            return rec.model_copy(
                update={
                    "name": stamp.name or rec.name,
                    "agent_version": hello.agent_version,
                    "protocol": hello.protocol,
                    "link": stamp.link,
                    "host": stamp.host,
                    "last_hello": now,
                    "last_heartbeat": now,
                    "capabilities": list(hello.capabilities),
                    "config_uuid": hello.config_uuid,
                    "hostname": hello.hostname or rec.hostname,
                }
            )

        await self.registry.change(stamp.vm, update)
        self.guest_rpcs(RPC_HELLO, stamp.link.value).inc()
        matches = hello.vm is None or hello.vm == stamp.vm
        if not matches:
            self.ctx.log.info(
                "hello from VM %s whose config names %s (a clone?)",
                stamp.vm,
                hello.vm,
                extra={"vm": stamp.vm, "claimed": hello.vm},
            )
        ack = HelloAck(
            vm=stamp.vm,
            link=stamp.link,
            host=stamp.host,
            protocol=PROTOCOL_VERSION,
            identity_matches=matches,
            heartbeat_interval=self.settings.heartbeat_interval,
            server_time=now,
        )
        return ack.model_dump_json().encode()

    async def heartbeat(self, request: Request) -> bytes:
        stamp = stamp_of(request)
        beat = parse_request(Heartbeat, request.data)
        self._refuse_claim(RPC_HEARTBEAT, stamp, beat.vm)
        now = datetime.now(UTC)
        # Answer at once and record the beat behind the reply: the registry write (a KV read
        # and a compare-and-set) would otherwise double the guest's round trip. Beats of one
        # VM that arrive while its write runs are coalesced into the next write.
        first = stamp.vm not in self._beats
        self._beats[stamp.vm] = (now, stamp, beat)
        if first:
            task = asyncio.ensure_future(self._record_beats(stamp.vm))
            self._beat_tasks.add(task)
            task.add_done_callback(self._beat_tasks.discard)
        self.guest_rpcs(RPC_HEARTBEAT, stamp.link.value).inc()
        return HeartbeatAck(seq=beat.seq, server_time=now).model_dump_json().encode()

    async def _record_beats(self, vm: str) -> None:
        while vm in self._beats:
            pending = self._beats[vm]
            try:
                await self.registry.change(vm, functools.partial(_beat_update, *pending))
            except Exception:
                self.ctx.log.exception("recording a heartbeat of VM %s failed", vm)
            if self._beats.get(vm) is pending:
                del self._beats[vm]
                break
            # More beats came while writing: take the newest after a pause, so a VM that
            # beats fast costs one registry write per interval, not one per beat.
            await asyncio.sleep(self.settings.heartbeat_record_interval)

    async def _certificate(self, request: Request, endpoint: str) -> bytes:
        stamp = stamp_of(request)
        body = parse_request(GuestCertRequest, request.data)
        self._refuse_claim(endpoint, stamp, body.vm)
        issue = CertIssueRequest(csr=body.csr, vm=stamp.vm, stamped_vm=stamp.vm)
        return await ca_call(self.ctx.nc, endpoint, issue.model_dump_json().encode())

    async def enroll(self, request: Request) -> bytes:
        stamp = stamp_of(request)
        if stamp.link is not LinkKind.SERIAL:
            raise BusError(
                errors.NOT_ALLOWED,
                "enrollment needs the serial link, where the hypervisor vouches for the VM; "
                "over IP only renewal of a valid certificate is possible",
                status=403,
            )
        return await self._certificate(request, CA_ISSUE)

    async def renew(self, request: Request) -> bytes:
        return await self._certificate(request, CA_RENEW)

    async def self_service(self, method: str, request: Request) -> bytes:
        """A guest's self-service restore request, sent on to the host adapter of the VM
        the terminator stamped: the subject names that VM, so no payload can reach another's
        snapshots. The link headers go along (the adapter records who asked)."""
        stamp = stamp_of(request)
        subject = hv_subject(stamp.vm, SSR_FORWARD[method])
        headers = {HEADER_VM: stamp.vm, HEADER_LINK: stamp.link.value, HEADER_HOST: stamp.host}
        try:
            reply = await self.ctx.nc.request(subject, request.data, timeout=85.0, headers=headers)
        except NoRespondersError:
            raise BusError(
                errors.UNAVAILABLE,
                "no hypervisor adapter answers for this VM (its host's serial-bridge has no "
                "libvirt access, or the VM is not a libvirt domain)",
                503,
            ) from None
        except NatsTimeout:
            raise BusError(errors.TIMEOUT, f"{subject} did not answer in time", 504) from None
        self.guest_rpcs(method, stamp.link.value).inc()
        err = BusError.from_reply(reply.headers, reply.data)
        if err is not None:
            raise err
        return reply.data

    async def report(self, request: Request) -> bytes:
        stamp = stamp_of(request)
        info = parse_request(GuestInfo, request.data)
        self._refuse_claim(RPC_REPORT, stamp, info.vm)

        def update(rec: VmRecord) -> VmRecord:
            return rec.model_copy(
                update={
                    "hostname": info.hostname,
                    "os": info.os,
                    "kernel": info.kernel,
                    "agent_version": info.agent_version,
                }
            )

        await self.registry.change(stamp.vm, update)
        self.guest_rpcs(RPC_REPORT, stamp.link.value).inc()
        return ReportAck(accepted=True).model_dump_json().encode()

    # --- link state ------------------------------------------------------------------------

    async def on_link_event(self, msg: object) -> None:
        data = getattr(msg, "data", b"")
        try:
            event = LinkEvent.model_validate_json(data)
        except ValidationError:
            return
        if event.state is not LinkState.DOWN:
            return

        def update(rec: VmRecord) -> VmRecord | None:
            # Only the terminator that holds the link may take it down (a VM that moved
            # to another host keeps its new link).
            if rec.link is LinkKind.DOWN or rec.host != event.host or rec.link != event.link:
                return None
            return rec.model_copy(update={"link": LinkKind.DOWN})

        await self.registry.change(event.vm, update)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except Exception:  # a bus hiccup must not end the sweeping
                self.ctx.log.exception("registry sweep failed")

    async def sweep(self) -> int:
        """Mark VMs down whose heartbeats stopped; returns how many this replica marked."""
        records = await self.registry.all()
        counts = {kind.value: 0 for kind in LinkKind}
        for rec in records:
            counts[rec.link.value] += 1
        for kind, n in counts.items():
            self.vms_by_link.labels(kind).set(n)
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.down_grace)
        marked = 0
        for rec in records:
            if rec.link is LinkKind.DOWN or (rec.last_heartbeat and rec.last_heartbeat > cutoff):
                continue
            changed = await self.registry.change(rec.uuid, lambda r: self._down_if_stale(r, cutoff))
            if changed is not None and changed.link is LinkKind.DOWN and changed != rec:
                marked += 1
                self.marked_down.inc()
                silent = time.time() - (rec.last_heartbeat.timestamp() if rec.last_heartbeat else 0)
                await self._publish(
                    evt_subject(EVT_VM, rec.uuid),
                    VmEvent(
                        vm=rec.uuid,
                        kind="down",
                        detail=f"no heartbeat for {silent:.0f}s (grace "
                        f"{self.settings.down_grace:.0f}s) via {rec.host}",
                    ),
                )
        return marked

    @staticmethod
    def _down_if_stale(rec: VmRecord, cutoff: datetime) -> VmRecord | None:
        if rec.link is LinkKind.DOWN or (rec.last_heartbeat and rec.last_heartbeat > cutoff):
            return None
        return rec.model_copy(update={"link": LinkKind.DOWN})

    async def _publish(self, subject: str, event: BaseModel) -> None:
        await self.ctx.nc.publish(subject, event.model_dump_json().encode())


def _beat_update(now: datetime, stamp: Stamp, beat: Heartbeat, rec: VmRecord) -> VmRecord:
    changes: dict[str, object] = {"last_heartbeat": now, "link": stamp.link, "host": stamp.host}
    if beat.config_uuid:
        changes["config_uuid"] = beat.config_uuid
    if stamp.name:
        changes["name"] = stamp.name
    return rec.model_copy(update=changes)


class GuestCertRequest(BaseModel):
    """What an agent sends to ``enroll`` / ``renew``: a CSR made in the guest."""

    csr: str = Field(max_length=16384)
    vm: str | None = None
