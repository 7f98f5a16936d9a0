"""The host adapter: snapshots and restore disks for the libvirt domains of this host.

For every VM the bridge discovers that libvirt knows (running or defined) it serves
``gb.hv.<vm>.*`` (one bridge per host, so a plain subscription per VM, no queue group); a VM
on no adapter's host gets "no responders" at once. The subject names the VM, and every
operation looks only at that VM's domain: a VM can never reach another's snapshots.

- ``snapshot_create``: optionally quiesced by the VM's agent (``freeze`` → libvirt's atomic
  disk-only snapshot → ``thaw``, the thaw sent whenever the freeze may have happened); the
  record of how it was taken goes to KV ``gb_snapshots`` and ``gb.evt.snapshot.<vm>``.
- ``snapshot_list`` / ``snapshot_delete``: libvirt says what exists; the records say how.
- ``restore_attach`` / ``restore_detach`` / ``restore_list``: a snapshot's image attached
  read-only to the running domain, recorded in KV ``gb_restores`` with its detach time; a
  loop detaches what is due, also after a restart of the bridge.

libvirt calls block, so they run in a thread pool of their own: one VM's slow operation (a
block commit, a guest that does not let go of a disk) never holds up another VM's. The
operations on one VM take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import Any, Literal, TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError

from guestbus.contract import (
    CMD_FREEZE,
    CMD_SSR_UNMOUNT,
    CMD_THAW,
    ERROR_CONFLICT,
    ERROR_NOT_FOUND,
    ERROR_NOT_RUNNING,
    ERROR_UNKNOWN_VM,
    EVT_SNAPSHOT,
    HEADER_DEADLINE_MS,
    HEADER_LINK,
    HEADER_REQUEST_ID,
    HEADER_VM,
    HOST_CAP_RESTORE,
    HOST_CAP_SNAPSHOT,
    HV_OPS,
    HV_RESTORE_ATTACH,
    HV_RESTORE_DETACH,
    HV_RESTORE_LIST,
    HV_SNAPSHOT_CREATE,
    HV_SNAPSHOT_DELETE,
    HV_SNAPSHOT_LIST,
    KV_RESTORES,
    KV_SNAPSHOTS,
    NAME_MAX,
    Consistency,
    FreezeRequest,
    FreezeResult,
    RestoreAttachment,
    RestoreAttachRequest,
    RestoreDetachReply,
    RestoreDetachRequest,
    RestoreListReply,
    ScriptState,
    SnapshotCreateRequest,
    SnapshotDeleteReply,
    SnapshotDeleteRequest,
    SnapshotDisk,
    SnapshotEvent,
    SnapshotListReply,
    SnapshotRecord,
    SnapshotStep,
    SsrUnmountReply,
    SsrUnmountRequest,
    ThawResult,
    evt_subject,
    guest_subject,
    hv_wildcard,
    utcnow,
)
from guestbus.kvscan import kv_scan
from guestbus.provision import provision
from guestbus.runtime import BusError, ServiceContext, check_reply, parse_request
from guestbus.runtime.nats import flush_interest
from guestbus.runtime.service import LATENCY_BUCKETS
from guestbus.wire import errors

from .hypervisor import Hypervisor, HypervisorUnavailable, SnapshotInfo
from .settings import BridgeSettings

log = logging.getLogger("guestbus.serial-bridge.adapter")

T = TypeVar("T")
State = Literal["off", "waiting", "ready"]

CAPABILITIES = [HOST_CAP_SNAPSHOT, HOST_CAP_RESTORE]
"""What VmRecord.host_capabilities says for a VM this adapter serves."""
LIBVIRT_THREADS = 8
CONCURRENCY_PER_VM = 4
"""Requests for one VM handled at once (the changes among them take turns)."""
RECONNECT_INTERVAL = 30.0
"""Seconds between attempts to reach a libvirt that did not answer."""
LIBVIRT_WAIT = 10.0
"""How long discovery waits for libvirt (connect, list domains): a hung libvirtd must not
hold up the links."""
NEVER_FROZE = frozenset(
    {errors.NO_ACTIVE_LINK, errors.FROZEN, errors.NOT_ALLOWED, errors.UNKNOWN_METHOD}
    | {errors.BAD_REQUEST, errors.HELLO_REQUIRED, errors.RATE_LIMITED}
)
"""Freeze answers that prove this freeze did not happen: no thaw is sent after them (a thaw
would end someone else's freeze)."""
FROZEN_PROOF_MARGIN = 1.0
"""Seconds of the guest's freeze deadline not relied on when timing proves it was still
frozen at the snapshot (the guest's clock may run a little faster)."""
SNAPSHOT_BUCKETS = (*LATENCY_BUCKETS, 60.0, 120.0)
OUTSIDE = "taken outside guestbus"


def _restore_disk(info: SnapshotInfo, wanted: str | None) -> tuple[SnapshotDisk, str]:
    """The snapshot's disk to attach (its first by default) and the attachment's label: the
    snapshot's name for the first disk (what the guest asks for most), ``<name>-<disk>`` for
    another, so that every disk of one snapshot can be attached at once."""
    if not info.disks:
        raise BusError(
            errors.BAD_REQUEST,
            f"snapshot {info.name} has no disk image to attach (not an external disk snapshot)",
        )
    if wanted is None:
        return info.disks[0], info.name
    for index, disk in enumerate(info.disks):
        if disk.target == wanted:
            label = info.name if index == 0 else f"{info.name}-{disk.target}"
            if len(label) > NAME_MAX:
                raise BusError(
                    errors.BAD_REQUEST,
                    f"the restore disk of {info.name}'s disk {wanted} would be labelled "
                    f"{label!r}, longer than {NAME_MAX} characters: use a shorter snapshot name",
                )
            return disk, label
    raise BusError(
        errors.BAD_REQUEST,
        f"snapshot {info.name} has no disk {wanted} (its disks: "
        f"{', '.join(d.target for d in info.disks)})",
    )


def _key(vm: str, name: str) -> str:
    return f"{vm}.{name}"


class HostAdapter:
    """Serves ``gb.hv.<vm>.*`` for the VMs the bridge found that libvirt knows."""

    def __init__(self, ctx: ServiceContext, settings: BridgeSettings) -> None:
        self.ctx = ctx
        self.nc = ctx.nc
        self.settings = settings
        self.host = settings.bridge_host
        self.state: State = "off"
        self.hv: Hypervisor | None = None
        self.version: str | None = None
        self.pool = ThreadPoolExecutor(LIBVIRT_THREADS, thread_name_prefix="libvirt")
        self.subs: dict[str, Subscription] = {}
        self.restores: dict[str, RestoreAttachment] = {}
        """``<vm>.<label>`` → the restore disks attached on this host (mirrors KV)."""
        self.kv_snapshots: KeyValue | None = None
        self.kv_restores: KeyValue | None = None
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._last_attempt = 0.0
        self._warned = False
        self._ops: dict[str, Callable[[str, bytes, Mapping[str, str]], Awaitable[BaseModel]]] = {
            HV_SNAPSHOT_CREATE: self.snapshot_create,
            HV_SNAPSHOT_LIST: self.snapshot_list,
            HV_SNAPSHOT_DELETE: self.snapshot_delete,
            HV_RESTORE_ATTACH: self.restore_attach,
            HV_RESTORE_DETACH: self.restore_detach,
            HV_RESTORE_LIST: self.restore_list,
        }
        assert set(self._ops) == set(HV_OPS)
        self._metrics()

    def _metrics(self) -> None:
        registry = self.ctx.registry
        self.m_created = Counter(
            "guestbus_snapshots_total",
            "Snapshots taken by this host adapter, by consistency (application, filesystem, "
            "crash).",
            ["consistency"],
            registry=registry,
        )
        self.m_failures = Counter(
            "guestbus_snapshot_failures_total",
            "Host adapter operations that failed, by operation and error code.",
            ["op", "code"],
            registry=registry,
        )
        self.m_seconds = Histogram(
            "guestbus_snapshot_seconds",
            "Duration of libvirt's snapshot call (the part inside the freeze window).",
            buckets=SNAPSHOT_BUCKETS,
            registry=registry,
        )
        self.m_frozen = Histogram(
            "guestbus_snapshot_freeze_window_seconds",
            "From the guest's freeze answer to its thaw answer, as the host adapter saw it.",
            buckets=SNAPSHOT_BUCKETS,
            registry=registry,
        )
        self.m_attached = Gauge(
            "guestbus_restore_disks_attached",
            "Restore disks attached to VMs of this host now.",
            registry=registry,
        )
        self.m_detached = Counter(
            "guestbus_restore_detached_total",
            "Restore disks detached: on request, when due (auto), or found gone (the VM stopped).",
            ["how"],
            registry=registry,
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach libvirt; without it the bridge works on, without the adapter."""
        if not self.settings.libvirt_uri:
            log.info("host adapter off: GUESTBUS_LIBVIRT_URI is empty (no snapshots here)")
            return
        try:
            self.hv = Hypervisor(self.settings.libvirt_uri)
        except HypervisorUnavailable as exc:
            log.warning("host adapter off: %s; snapshots and restore disks are unavailable", exc)
            return
        self.state = "waiting"
        await self._connect()

    async def _connect(self) -> None:
        assert self.hv is not None
        self._last_attempt = time.monotonic()
        reason: str | None = None
        try:
            self.version = await asyncio.wait_for(self._hv(self.hv.connect), LIBVIRT_WAIT)
        except HypervisorUnavailable as exc:
            reason = str(exc)
        except asyncio.TimeoutError:
            reason = f"libvirt at {self.settings.libvirt_uri} did not answer in {LIBVIRT_WAIT:g} s"
        if reason is not None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "host adapter waiting for libvirt: %s; snapshots and restore disks are "
                    "unavailable until it answers (trying again every %.0f s)",
                    reason,
                    RECONNECT_INTERVAL,
                )
            return
        try:
            await self._open_buckets()
            await self._load_restores()
        except Exception as exc:
            log.error("host adapter off: its KV buckets cannot be used: %r", exc)
            self.state = "off"
            self.hv.close()
            return
        self.state = "ready"
        log.info(
            "host adapter ready",
            extra={
                "libvirt_uri": self.settings.libvirt_uri,
                "libvirt_version": self.version,
                "restore_disks": len(self.restores),
            },
        )
        self.ctx.spawn(self._restores_forever(), name="restore-disks")

    async def _open_buckets(self) -> None:
        js = self.ctx.js
        try:
            self.kv_snapshots = await js.key_value(KV_SNAPSHOTS)
            self.kv_restores = await js.key_value(KV_RESTORES)
        except BucketNotFoundError:
            await provision(js, self.settings.js_replicas)
            self.kv_snapshots = await js.key_value(KV_SNAPSHOTS)
            self.kv_restores = await js.key_value(KV_RESTORES)

    async def close(self) -> None:
        for vm in list(self.subs):
            await self._unserve(vm)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.hv is not None:
            self.hv.close()

    async def _hv(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    def _lock(self, vm: str) -> asyncio.Lock:
        lock = self._locks.get(vm)
        if lock is None:
            lock = self._locks[vm] = asyncio.Lock()
        return lock

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # --- which VMs are served --------------------------------------------------------------

    async def sync(self, discovered: set[str]) -> set[str]:
        """Serve the discovered VMs libvirt knows, stop serving the others; returns the VMs
        served (their registry record says they have host capabilities). Called by every
        discovery scan."""
        if self.state == "off":
            return set()
        if self.state == "waiting":
            if time.monotonic() - self._last_attempt >= RECONNECT_INTERVAL:
                await self._connect()
            if not self.ready:
                return set()
        assert self.hv is not None
        try:
            known = await asyncio.wait_for(self._hv(self.hv.domain_uuids), LIBVIRT_WAIT)
        except (BusError, asyncio.TimeoutError) as exc:
            # libvirt is down for a moment: keep serving (requests get hypervisor_error)
            log.debug("listing libvirt domains failed: %s", exc)
            known = set(self.subs)
        wanted = discovered & known
        for vm in [v for v in self.subs if v not in wanted]:
            await self._unserve(vm)
        added = []
        for vm in [v for v in wanted if v not in self.subs]:
            try:
                self.subs[vm] = await self.ctx.subscribe(
                    hv_wildcard(vm), partial(self._on_message, vm), concurrency=CONCURRENCY_PER_VM
                )
            except Exception as exc:  # tried again at the next scan
                log.warning("host adapter cannot serve VM %s now: %r", vm, exc, extra={"vm": vm})
                continue
            added.append(vm)
        if added:
            await flush_interest(self.nc)
            log.info("host adapter serves %d VM(s) more", len(added), extra={"vms": added})
        return set(self.subs)

    async def _unserve(self, vm: str) -> None:
        sub = self.subs.pop(vm, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await self.ctx.unsubscribe(sub)
            log.info("host adapter no longer serves VM %s", vm, extra={"vm": vm})

    def capabilities(self, vm: str) -> list[str]:
        return list(CAPABILITIES) if vm in self.subs else []

    # --- requests --------------------------------------------------------------------------

    async def _on_message(self, vm: str, msg: Msg) -> None:
        if not msg.reply:
            return  # nobody to answer: a change nobody waits for is not made
        op = msg.subject.rsplit(".", 1)[-1]
        headers = msg.headers or {}
        try:
            handler = self._ops.get(op)
            if handler is None:
                raise BusError(
                    errors.UNKNOWN_METHOD,
                    f"no host adapter operation {op!r} (known: {', '.join(HV_OPS)})",
                    404,
                )
            claimed = headers.get(HEADER_VM)
            if claimed is not None and claimed.lower() != vm:
                raise BusError(
                    errors.BAD_REQUEST, f"{HEADER_VM} {claimed} is not the subject's VM {vm}"
                )
            if not self.ready:
                raise BusError(
                    errors.UNAVAILABLE, "the host adapter has no libvirt connection now", 503
                )
            result = await handler(vm, msg.data, headers)
            body, reply_headers = result.model_dump_json().encode(), None
        except BusError as err:
            self.m_failures.labels(op if op in HV_OPS else "unknown", err.code).inc()
            body, reply_headers = err.to_bytes(), err.headers()
        except Exception:
            log.exception("host adapter %s for VM %s failed", op, vm, extra={"vm": vm})
            self.m_failures.labels(op, errors.INTERNAL).inc()
            internal = BusError(
                errors.INTERNAL,
                f"internal error in the host adapter while handling {op}; "
                "the cause is in the serial-bridge's log",
                500,
            )
            body, reply_headers = internal.to_bytes(), internal.headers()
        try:
            await self.nc.publish(msg.reply, body, headers=reply_headers)
        except Exception as exc:
            log.warning("could not answer %s: %s", msg.subject, exc)

    async def _guest(self, vm: str, method: str, params: BaseModel | None, timeout: float) -> bytes:
        """A command to the VM's agent; typed errors (``no_active_link`` without a link)."""
        headers = {
            HEADER_REQUEST_ID: f"hv-{secrets.token_hex(8)}",
            HEADER_DEADLINE_MS: str(max(10, int(timeout * 1000))),
        }
        data = params.model_dump_json(exclude_none=True).encode() if params else b"{}"
        try:
            msg = await self.nc.request(
                guest_subject(vm, method), data, timeout=timeout + 2.0, headers=headers
            )
        except NoRespondersError:
            raise BusError(
                errors.NO_ACTIVE_LINK, "the VM's agent has no link up (serial or IP)", 503
            ) from None
        except (NatsTimeout, asyncio.TimeoutError):
            raise BusError(
                errors.TIMEOUT, f"the agent did not answer {method} within {timeout:.0f} s", 504
            ) from None
        except NatsError as exc:
            raise BusError(errors.UNAVAILABLE, f"{method} not sent: {exc!r}", 503) from None
        return check_reply(msg.headers, msg.data)

    async def _event(
        self,
        vm: str,
        action: str,
        name: str,
        consistency: Consistency | None = None,
        detail: str | None = None,
    ) -> None:
        event = SnapshotEvent(
            vm=vm, action=action, name=name, host=self.host, consistency=consistency, detail=detail
        )
        try:
            await self.nc.publish(evt_subject(EVT_SNAPSHOT, vm), event.model_dump_json().encode())
        except Exception as exc:
            log.warning("could not publish snapshot event for %s: %s", vm, exc)

    # --- snapshots -------------------------------------------------------------------------

    async def snapshot_create(
        self, vm: str, data: bytes, headers: Mapping[str, str]
    ) -> SnapshotRecord:
        req = parse_request(SnapshotCreateRequest, data)
        assert self.hv is not None
        hv = self.hv
        created_at = utcnow()
        name = req.name or f"snap-{created_at:%Y%m%dT%H%M%SZ}"
        async with self._lock(vm):
            if req.quiesce and not await self._hv(hv.is_running, vm):
                raise BusError(
                    ERROR_NOT_RUNNING,
                    f"VM {vm} is not running: a quiesced snapshot needs its agent (take it "
                    "without quiesce: a stopped VM's disks are at rest)",
                    409,
                )
            # everything slow happens before the freeze
            plan = await self._hv(hv.plan_snapshot, vm, name, "guestbus")
            steps: list[SnapshotStep] = []
            reasons: list[str] = []
            freeze: FreezeResult | None = None
            thaw: ThawResult | None = None
            attempted = False
            sent = frozen_at = time.monotonic()
            if req.quiesce:
                deadline = req.freeze_deadline or self.settings.freeze_deadline
                try:
                    raw = await self._guest(
                        vm,
                        CMD_FREEZE,
                        FreezeRequest(deadline=deadline, snapshot=name),
                        self.settings.freeze_timeout,
                    )
                except BusError as err:
                    attempted = err.code not in NEVER_FROZE
                    detail = f"{err.code}: {err.message}"
                    reasons.append(f"freeze failed ({detail})")
                else:
                    attempted = True
                    try:
                        freeze = FreezeResult.model_validate_json(raw)
                    except ValidationError as exc:
                        detail = f"unreadable freeze result: {exc.errors()[0]['msg']}"
                        reasons.append(f"freeze failed ({detail})")
                    else:
                        detail = (
                            f"{freeze.consistency.value}: {len(freeze.frozen)} file system(s) "
                            f"frozen, deadline {freeze.deadline_seconds:g} s"
                        )
                frozen_at = time.monotonic()
                steps.append(
                    SnapshotStep(
                        step="freeze",
                        ok=freeze is not None,
                        seconds=round(frozen_at - sent, 4),
                        detail=detail,
                    )
                )
            # --- the freeze window: the snapshot, then the thaw; nothing else ---
            started = time.monotonic()
            failure: BusError | None = None
            try:
                await self._hv(hv.take_snapshot, plan)
            except BusError as err:
                failure = err
            taken = time.monotonic()
            thaw_detail: str | None = None
            if attempted:
                try:
                    raw = await self._guest(vm, CMD_THAW, None, self.settings.freeze_timeout)
                    thaw = ThawResult.model_validate_json(raw)
                except BusError as err:
                    thaw_detail = f"{err.code}: {err.message}"
                except ValidationError as exc:
                    thaw_detail = f"unreadable thaw result: {exc.errors()[0]['msg']}"
            thawed = time.monotonic()
            # --- window closed ---
            self.m_seconds.observe(taken - started)
            disks = ", ".join(f"{d.target} → {d.overlay}" for d in plan.disks)
            skipped = f"; not taken: {', '.join(plan.skipped)}" if plan.skipped else ""
            steps.append(
                SnapshotStep(
                    step="snapshot",
                    ok=failure is None,
                    seconds=round(taken - started, 4),
                    detail=(failure.message if failure else disks) + skipped,
                )
            )
            if attempted:
                if thaw is not None:
                    thaw_detail = f"{len(thaw.thawed)} file system(s) thawed" + (
                        " (the guest had thawed by itself: deadline passed)"
                        if thaw.self_thawed
                        else ""
                    )
                else:
                    reasons.append(
                        f"thaw failed ({thaw_detail}); the guest thaws by itself at its deadline"
                    )
                steps.append(
                    SnapshotStep(
                        step="thaw",
                        ok=thaw is not None,
                        seconds=round(thawed - taken, 4),
                        detail=thaw_detail,
                    )
                )
            if failure is not None:
                log.warning(
                    "snapshot %s of VM %s failed: %s", name, vm, failure.message, extra={"vm": vm}
                )
                raise failure
            consistency, why = self._consistency(req.quiesce, freeze, thaw, taken - sent, reasons)
            frozen_seconds: float | None = None
            if freeze is not None and thaw is not None:
                self.m_frozen.observe(thawed - frozen_at)
                frozen_seconds = (
                    thaw.frozen_seconds
                    if thaw.frozen_seconds is not None
                    else round(thawed - frozen_at, 4)
                )
            record = SnapshotRecord(
                vm=vm,
                name=name,
                host=self.host,
                created_at=created_at,
                quiesce_requested=req.quiesce,
                consistency=consistency,
                reasons=why,
                frozen_seconds=frozen_seconds,
                steps=steps,
                disks=list(plan.disks),
                freeze=freeze,
                thaw=thaw,
            )
            self.m_created.labels(consistency.value).inc()
            try:
                assert self.kv_snapshots is not None
                await self.kv_snapshots.put(_key(vm, name), record.model_dump_json().encode())
            except Exception as exc:  # the snapshot exists; only its details are not kept
                log.warning("could not record snapshot %s of %s: %r", name, vm, exc)
            await self._event(vm, "created", name, consistency, "; ".join(why) or None)
            log.info(
                "snapshot taken",
                extra={"vm": vm, "snapshot": name, "consistency": consistency.value},
            )
            return record

    @staticmethod
    def _consistency(
        quiesce: bool,
        freeze: FreezeResult | None,
        thaw: ThawResult | None,
        since_freeze_sent: float,
        reasons: list[str],
    ) -> tuple[Consistency, list[str]]:
        """What the snapshot can be trusted for, and why not more."""
        if not quiesce:
            return Consistency.CRASH, ["not requested"]
        if freeze is None:
            return Consistency.CRASH, reasons
        # Still frozen at the snapshot? The thaw says so (the guest had not thawed by itself),
        # or the time does: the guest's deadline runs from a moment after the freeze was sent.
        in_time = since_freeze_sent < freeze.deadline_seconds - FROZEN_PROOF_MARGIN
        if not in_time and (thaw is None or thaw.self_thawed):
            late = (
                f"the guest thawed by itself (its {freeze.deadline_seconds:g} s deadline passed) "
                "before the snapshot was taken"
                if thaw is not None
                else "cannot tell whether the guest was still frozen at the snapshot"
            )
            return Consistency.CRASH, [*reasons, late]
        why = list(reasons)
        if freeze.consistency is not Consistency.APPLICATION:
            pre = freeze.pre_freeze
            if pre.state is not ScriptState.OK:
                why.append(
                    f"pre_freeze {pre.state.value}" + (f": {pre.reason}" if pre.reason else "")
                )
            if not freeze.frozen:
                why.append("no file system was frozen")
            why += freeze.notes
        return freeze.consistency, why

    async def snapshot_list(
        self, vm: str, data: bytes, headers: Mapping[str, str]
    ) -> SnapshotListReply:
        assert self.hv is not None
        infos = await self._hv(self.hv.snapshots, vm)
        records = await asyncio.gather(*(self._record_of(vm, info) for info in infos))
        return SnapshotListReply(snapshots=sorted(records, key=lambda r: r.created_at))

    async def _record_of(self, vm: str, info: SnapshotInfo) -> SnapshotRecord:
        """libvirt's snapshot with the details of our record (its disks as they are now)."""
        assert self.kv_snapshots is not None
        record: SnapshotRecord | None = None
        try:
            entry = await self.kv_snapshots.get(_key(vm, info.name))
        except KeyNotFoundError:
            pass
        else:
            if entry.value:
                with contextlib.suppress(ValidationError):
                    record = SnapshotRecord.model_validate_json(entry.value)
        # a record of an earlier snapshot of the same name (deleted outside guestbus)?
        tolerance = self.settings.freeze_timeout + 60.0
        if record is not None and (
            abs((record.created_at - info.created_at).total_seconds()) > tolerance
        ):
            record = None
        if record is None:
            return SnapshotRecord(
                vm=vm,
                name=info.name,
                host=self.host,
                created_at=info.created_at,
                quiesce_requested=False,
                consistency=Consistency.CRASH,
                reasons=[OUTSIDE],
                disks=list(info.disks),
            )
        return record.model_copy(update={"disks": list(info.disks)})

    async def snapshot_delete(
        self, vm: str, data: bytes, headers: Mapping[str, str]
    ) -> SnapshotDeleteReply:
        req = parse_request(SnapshotDeleteRequest, data)
        assert self.hv is not None and self.kv_snapshots is not None
        async with self._lock(vm):
            info = await self._hv(self.hv.snapshot, vm, req.name)
            await self._refuse_if_attached(vm, info)
            started = time.monotonic()
            await self._hv(self.hv.delete_snapshot, vm, req.name)
            seconds = time.monotonic() - started
            try:
                await self.kv_snapshots.delete(_key(vm, req.name))
            except Exception as exc:
                log.warning("could not remove the record of snapshot %s: %r", req.name, exc)
            merged = ", ".join(f"{d.overlay} → {d.file}" for d in info.disks)
            await self._event(vm, "deleted", req.name, detail=f"merged {merged} in {seconds:.1f} s")
            log.info("snapshot deleted", extra={"vm": vm, "snapshot": req.name})
            return SnapshotDeleteReply(name=req.name)

    async def _refuse_if_attached(self, vm: str, info: SnapshotInfo) -> None:
        """Deleting a snapshot writes its image (the overlay is merged into it) and removes
        the overlay: refused while a restore disk reads either (its own, or a later
        snapshot's, whose image has this one's below it)."""
        assert self.hv is not None
        touched = {d.file for d in info.disks} | {d.overlay for d in info.disks}
        for att in self._attachments(vm):
            disk = await self._hv(self.hv.restore_disk, vm, att.serial)
            reads = set(disk.files) if disk is not None else {att.file}
            if att.snapshot == info.name or reads & touched:
                raise BusError(
                    ERROR_CONFLICT,
                    f"snapshot {info.name} is in use by restore disk {att.label} "
                    f"({att.target}, snapshot {att.snapshot}): detach it first",
                    409,
                )

    # --- restore disks ---------------------------------------------------------------------

    def _attachments(self, vm: str) -> list[RestoreAttachment]:
        return sorted(
            (a for a in self.restores.values() if a.vm == vm), key=lambda a: a.attached_at
        )

    async def restore_attach(
        self, vm: str, data: bytes, headers: Mapping[str, str]
    ) -> RestoreAttachment:
        req = parse_request(RestoreAttachRequest, data)
        assert self.hv is not None and self.kv_restores is not None
        by = "guest" if HEADER_LINK in headers else "operator"
        async with self._lock(vm):
            info = await self._hv(self.hv.snapshot, vm, req.snapshot)
            disk, label = _restore_disk(info, req.disk)
            key = _key(vm, label)
            existing = self.restores.get(key)
            if existing is not None and (existing.snapshot, existing.disk) not in (
                (req.snapshot, disk.target),
                (req.snapshot, None),  # recorded before restore disks named their disk
            ):
                raise BusError(
                    ERROR_CONFLICT,
                    f"the label {label} is taken by the restore disk of snapshot "
                    f"{existing.snapshot}'s disk {existing.disk}: detach that one first",
                    409,
                )
            if existing is not None:
                if await self._hv(self.hv.restore_disk, vm, existing.serial) is not None:
                    return existing
                await self._forget(existing, "gone")  # the VM stopped since: attach anew
            if len(self._attachments(vm)) >= self.settings.restore_max_per_vm:
                raise BusError(
                    ERROR_CONFLICT,
                    f"VM {vm} has {self.settings.restore_max_per_vm} restore disks attached "
                    "already: detach one first",
                    409,
                )
            target, serial = await self._hv(self.hv.attach_restore_disk, vm, disk.file, disk.format)
            now = utcnow()
            ttl = min(req.ttl or self.settings.restore_ttl, self.settings.restore_ttl)
            att = RestoreAttachment(
                vm=vm,
                label=label,
                snapshot=req.snapshot,
                disk=disk.target,
                host=self.host,
                target=target,
                serial=serial,
                file=disk.file,
                attached_at=now,
                detach_at=now + timedelta(seconds=ttl),
                requested_by=by,
            )
            try:
                await self.kv_restores.put(key, att.model_dump_json().encode())
            except Exception as exc:
                # unrecorded, it would never be detached: take it back
                with contextlib.suppress(Exception):
                    await self._hv(
                        self.hv.detach_restore_disk, vm, serial, self.settings.detach_timeout
                    )
                raise BusError(
                    errors.UNAVAILABLE,
                    f"could not record the restore disk ({exc!r}); it was detached again",
                    503,
                ) from None
            self.restores[key] = att
            self.m_attached.set(len(self.restores))
            await self._event(
                vm,
                "attached",
                att.label,
                detail=f"{target} serial {serial} read-only, by {by}, until "
                f"{att.detach_at:%Y-%m-%dT%H:%M:%SZ}",
            )
            log.info(
                "restore disk attached",
                extra={
                    "vm": vm,
                    "snapshot": req.snapshot,
                    "disk": disk.target,
                    "target": target,
                    "by": by,
                },
            )
            return att

    async def restore_detach(
        self, vm: str, data: bytes, headers: Mapping[str, str]
    ) -> RestoreDetachReply:
        req = parse_request(RestoreDetachRequest, data)
        async with self._lock(vm):
            att = self.restores.get(_key(vm, req.label))
            if att is None:
                raise BusError(
                    ERROR_NOT_FOUND, f"VM {vm} has no restore disk labelled {req.label}", 404
                )
            unmounted = await self._detach(att, "detached")
            return RestoreDetachReply(label=req.label, unmounted=unmounted)

    async def restore_list(
        self, vm: str, data: bytes, headers: Mapping[str, str]
    ) -> RestoreListReply:
        return RestoreListReply(attachments=self._attachments(vm))

    async def _detach(
        self, att: RestoreAttachment, action: Literal["detached", "auto_detached"]
    ) -> bool | None:
        """Ask the agent to unmount (best effort), unplug, forget; the caller holds the VM's
        lock. Whether the agent unmounted it (None: it could not be asked)."""
        assert self.hv is not None
        try:
            present = await self._hv(self.hv.restore_disk, att.vm, att.serial)
        except BusError as err:
            if err.code != ERROR_UNKNOWN_VM:
                raise
            present = None
        if present is None:
            await self._forget(att, "gone")
            return None
        unmounted: bool | None = None
        try:
            raw = await self._guest(
                att.vm,
                CMD_SSR_UNMOUNT,
                SsrUnmountRequest(label=att.label),
                self.settings.unmount_timeout,
            )
            unmounted = SsrUnmountReply.model_validate_json(raw).unmounted
        except (BusError, ValidationError) as exc:
            log.info("restore disk %s of %s: no unmount in the guest (%s)", att.label, att.vm, exc)
        await self._hv(
            self.hv.detach_restore_disk, att.vm, att.serial, self.settings.detach_timeout
        )
        how = "" if unmounted is None else " (unmounted first)" if unmounted else " (not mounted)"
        await self._forget(att, action, f"{att.target} serial {att.serial}{how}")
        return unmounted

    async def _forget(self, att: RestoreAttachment, how: str, detail: str | None = None) -> None:
        """Drop the record of a restore disk that is no longer attached, and say so."""
        key = _key(att.vm, att.label)
        if self.kv_restores is not None:
            try:
                await self.kv_restores.delete(key)
            except Exception as exc:
                log.warning("could not remove restore record %s: %r", key, exc)
        self.restores.pop(key, None)
        self.m_attached.set(len(self.restores))
        self.m_detached.labels(how).inc()
        if how == "gone":
            await self._event(
                att.vm,
                "auto_detached",
                att.label,
                detail=f"{att.target} was gone already: the VM stopped or restarted "
                "(live attachments end with QEMU)",
            )
        else:
            await self._event(att.vm, how, att.label, detail=detail)
        log.info("restore disk %s", how, extra={"vm": att.vm, "label": att.label})

    # --- detaching what is due --------------------------------------------------------------

    async def _load_restores(self) -> None:
        """The restore disks this host attached (before a restart too)."""
        assert self.kv_restores is not None
        for key, item in (await kv_scan(self.kv_restores)).items():
            try:
                att = RestoreAttachment.model_validate_json(item.value)
            except ValidationError:
                log.warning("ignoring unreadable restore record %s", key)
                continue
            if att.host == self.host:
                self.restores[key] = att
        self.m_attached.set(len(self.restores))

    async def _restores_forever(self) -> None:
        while True:
            try:
                await self.check_restores()
            except Exception:
                log.exception("checking restore disks failed")
            await asyncio.sleep(self.settings.restore_check_interval)

    async def check_restores(self) -> None:
        """Detach the restore disks that are due; forget the ones whose VM stopped."""
        by_vm: dict[str, list[RestoreAttachment]] = {}
        for att in list(self.restores.values()):
            by_vm.setdefault(att.vm, []).append(att)
        await asyncio.gather(*(self._check_vm(vm, atts) for vm, atts in by_vm.items()))

    async def _check_vm(self, vm: str, atts: list[RestoreAttachment]) -> None:
        assert self.hv is not None
        async with self._lock(vm):
            for att in atts:
                if self.restores.get(_key(vm, att.label)) is not att:
                    continue  # detached (or attached anew) meanwhile
                try:
                    present = await self._hv(self.hv.restore_disk, vm, att.serial)
                except BusError as err:
                    if err.code != ERROR_UNKNOWN_VM:
                        log.info("cannot check restore disk %s of %s: %s", att.label, vm, err)
                        continue
                    present = None
                if present is None:
                    await self._forget(att, "gone")
                elif att.detach_at <= utcnow():
                    try:
                        await self._detach(att, "auto_detached")
                    except BusError as err:
                        self.m_failures.labels("auto_detach", err.code).inc()
                        log.warning(
                            "restore disk %s of %s is due but stays attached for now: %s",
                            att.label,
                            vm,
                            err.message,
                            extra={"vm": vm},
                        )
