"""The host adapter's hands on libvirt: a thin synchronous wrapper around libvirt-python.

Every call blocks (libvirt-python releases the GIL while it waits), so the bus side runs
them in a thread pool. One connection for the process, opened on first use and opened again
when libvirt drops it (a read is retried once on the new connection; a change is not, since
it may have happened). Domains are named by uuid. What goes wrong comes back as a
:class:`BusError` with a stable code of the contract and libvirt's own words.

Snapshots are libvirt's disk-only external snapshots, atomic across the VM's disks: each
writable file-backed disk goes on writing to a new qcow2 overlay next to its current image
(``<dir>/<stem>.<snapshot>.qcow2``) and the image it wrote until then is the snapshot's
content, read-only from then on. Deleting a snapshot is libvirt's (9.0+ deletes external
snapshots of running and shut-off domains: it commits the overlay into the image below and
pivots the disk to it, so the guest's data stays whole). Restore disks are a snapshot's image
attached read-only to the running domain, live only, with a ``gbssr-`` serial the guest finds
them by.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import quoteattr

from guestbus.contract import (
    ERROR_CONFLICT,
    ERROR_HYPERVISOR,
    ERROR_NOT_RUNNING,
    ERROR_SNAPSHOT_EXISTS,
    ERROR_SNAPSHOT_NOT_FOUND,
    ERROR_UNKNOWN_VM,
    RESTORE_SERIAL_PREFIX,
    SnapshotDisk,
)
from guestbus.runtime import BusError
from guestbus.wire import errors

try:
    import libvirt
except ImportError:  # the adapter is off; the bridge links VMs all the same
    libvirt = None

log = logging.getLogger("guestbus.serial-bridge.hypervisor")

T = TypeVar("T")

DETACH_POLL = 0.1
"""Seconds between looks at the live XML while a restore disk is being unplugged."""
_TARGETS = [f"vd{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


class HypervisorUnavailable(Exception):
    """libvirt cannot be used: the binding is missing or the daemon does not answer."""


@dataclass(frozen=True)
class Layer:
    """One image of a disk's backing chain."""

    file: str
    format: str | None


@dataclass(frozen=True)
class Disk:
    """A disk of a domain as its XML describes it."""

    target: str
    device: str
    """disk, cdrom, floppy or lun."""
    type: str
    """file, block, network, volume, dir."""
    source: str | None
    format: str | None
    readonly: bool
    shareable: bool
    serial: str | None
    chain: tuple[Layer, ...]
    """The backing images, nearest first (not including ``source``)."""
    xml: str

    @property
    def restore(self) -> bool:
        """One of our restore disks."""
        return bool(self.serial and self.serial.startswith(RESTORE_SERIAL_PREFIX))

    @property
    def snapshottable(self) -> bool:
        """Taken in a snapshot: a writable file-backed disk (not a CD-ROM, not ours)."""
        return (
            self.device == "disk"
            and self.type == "file"
            and bool(self.source)
            and not self.readonly
            and not self.shareable
            and not self.restore
        )

    @property
    def files(self) -> tuple[str, ...]:
        """Every image this disk reads: its source and the backing chain."""
        return tuple(f for f in (self.source, *(layer.file for layer in self.chain)) if f)


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot as libvirt knows it."""

    name: str
    created_at: datetime
    disks: tuple[SnapshotDisk, ...]
    """Its external disks: each one's content (``file``) and the overlay written since."""
    description: str | None = None


@dataclass(frozen=True)
class SnapshotPlan:
    """What :meth:`Hypervisor.take_snapshot` will do, worked out beforehand (outside the
    guest's freeze window)."""

    vm: str
    name: str
    xml: str
    disks: tuple[SnapshotDisk, ...]
    skipped: tuple[str, ...]
    """Writable disks not taken and why (block or network storage)."""


def _lv() -> Any:
    if libvirt is None:
        raise HypervisorUnavailable(
            "the libvirt binding is not installed (pip install libvirt-python; it builds "
            "against libvirt-dev)"
        )
    return libvirt


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes them: we raise them."""


def _connection_lost(exc: Any) -> bool:
    lv = _lv()
    return exc.get_error_code() in (
        lv.VIR_ERR_SYSTEM_ERROR,
        lv.VIR_ERR_RPC,
        lv.VIR_ERR_NO_CONNECT,
        lv.VIR_ERR_INVALID_CONN,
    ) or exc.get_error_domain() in (lv.VIR_FROM_RPC, lv.VIR_FROM_REMOTE)


def _message(exc: Any) -> str:
    return str(exc.get_error_message() or exc).strip()


def _translate(exc: Any, vm: str) -> BusError:
    """A libvirt error as the typed error the caller gets."""
    lv = _lv()
    code = exc.get_error_code()
    text = _message(exc)
    if code == lv.VIR_ERR_NO_DOMAIN:
        return BusError(ERROR_UNKNOWN_VM, f"VM {vm} is not a libvirt domain on this host", 404)
    if code == lv.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return BusError(ERROR_SNAPSHOT_NOT_FOUND, f"VM {vm}: {text}", 404)
    if code == lv.VIR_ERR_OPERATION_INVALID and "not running" in text:
        return BusError(ERROR_NOT_RUNNING, f"VM {vm} is not running: {text}", 409)
    if _connection_lost(exc):
        return BusError(ERROR_HYPERVISOR, f"libvirt connection lost: {text}", 503)
    return BusError(ERROR_HYPERVISOR, f"libvirt: {text}", 502)


# --- domain XML ----------------------------------------------------------------------------


def _chain(element: ET.Element) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    store = element.find("backingStore")
    while store is not None:
        source = store.find("source")
        fmt = store.find("format")
        file = source.get("file") if source is not None else None
        if not file:
            break
        layers.append(Layer(file, fmt.get("type") if fmt is not None else None))
        store = store.find("backingStore")
    return tuple(layers)


def parse_disks(domain_xml: str) -> list[Disk]:
    """The ``<disk>`` devices of a domain's XML (live or persistent)."""
    root = ET.fromstring(domain_xml)
    disks = []
    for el in root.iterfind("./devices/disk"):
        target = el.find("target")
        if target is None or not target.get("dev"):
            continue
        source = el.find("source")
        driver = el.find("driver")
        serial = el.find("serial")
        src = None
        if source is not None:
            src = source.get("file") or source.get("dev") or source.get("name")
        disks.append(
            Disk(
                target=str(target.get("dev")),
                device=el.get("device", "disk"),
                type=el.get("type", "file"),
                source=src,
                format=driver.get("type") if driver is not None else None,
                readonly=el.find("readonly") is not None,
                shareable=el.find("shareable") is not None,
                serial=(serial.text or "").strip() or None if serial is not None else None,
                chain=_chain(el),
                xml=ET.tostring(el, encoding="unicode"),
            )
        )
    return disks


def _base_of(overlay: str, disks: list[Disk]) -> Layer | None:
    """The image right below ``overlay`` in a disk's backing chain."""
    for disk in disks:
        files = [Layer(disk.source, disk.format)] if disk.source else []
        files += disk.chain
        for upper, lower in zip(files, files[1:], strict=False):
            if upper.file == overlay:
                return lower
    return None


def parse_snapshot(snapshot_xml: str, current: list[Disk]) -> SnapshotInfo:
    """A ``<domainsnapshot>``; each external disk's content is the image below its overlay
    in the domain's chain now (libvirt rewires chains when a snapshot is deleted), else what
    the snapshot's own copy of the domain says the disk was on."""
    root = ET.fromstring(snapshot_xml)
    name = (root.findtext("name") or "").strip()
    created = int((root.findtext("creationTime") or "0").strip() or 0)
    description = (root.findtext("description") or "").strip() or None
    at_snapshot = {}
    domain = root.find("domain")
    if domain is not None:
        at_snapshot = {d.target: d for d in parse_disks(ET.tostring(domain, encoding="unicode"))}
    disks = []
    for el in root.iterfind("./disks/disk"):
        if el.get("snapshot") != "external":
            continue
        source = el.find("source")
        overlay = source.get("file") if source is not None else None
        target = el.get("name") or ""
        if not overlay:
            continue
        base = _base_of(overlay, current)
        if base is None and target in at_snapshot and at_snapshot[target].source:
            was = at_snapshot[target]
            base = Layer(str(was.source), was.format)
        if base is None:
            continue
        disks.append(
            SnapshotDisk(
                target=target, file=base.file, format=base.format or "raw", overlay=overlay
            )
        )
    return SnapshotInfo(
        name=name,
        created_at=datetime.fromtimestamp(created, UTC),
        disks=tuple(disks),
        description=description,
    )


def overlay_path(disk: Disk, name: str, overlays: dict[str, str], tag: str | None = None) -> Path:
    """``<dir>/<stem>.<name>.qcow2`` next to the disk's current image (``<stem>.<tag>.…``
    with a ``tag``); when that image is itself the overlay of one of our snapshots
    (``<stem>.<snap>.qcow2``), the stem is the original one, so names do not grow with every
    snapshot. ``overlays``: overlay file → snapshot name, of the domain's snapshots."""
    current = Path(str(disk.source))
    stem = current.stem if current.suffix else current.name
    earlier = overlays.get(str(current))
    if earlier is not None and stem.endswith("." + earlier):
        stem = stem[: -len(earlier) - 1]
    middle = f"{tag}.{name}" if tag else name
    return current.with_name(f"{stem}.{middle}.qcow2")


def snapshot_xml(name: str, entries: list[tuple[str, str | None]], description: str) -> str:
    """``<domainsnapshot>`` naming every disk: (target, overlay) external, (target, None) no."""
    parts = [f"<domainsnapshot><name>{name}</name>"]
    parts.append(f"<description>{_escape(description)}</description>")
    parts.append("<disks>")
    for target, overlay in entries:
        if overlay is None:
            parts.append(f"<disk name={quoteattr(target)} snapshot='no'/>")
        else:
            parts.append(
                f"<disk name={quoteattr(target)} snapshot='external' type='file'>"
                f"<driver type='qcow2'/><source file={quoteattr(overlay)}/></disk>"
            )
    parts.append("</disks></domainsnapshot>")
    return "".join(parts)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def restore_disk_xml(file: str, fmt: str, target: str, serial: str) -> str:
    return (
        "<disk type='file' device='disk'>"
        f"<driver name='qemu' type={quoteattr(fmt)}/>"
        f"<source file={quoteattr(file)}/>"
        f"<target dev={quoteattr(target)} bus='virtio'/>"
        "<readonly/>"
        f"<serial>{_escape(serial)}</serial>"
        "</disk>"
    )


def free_target(*domain_xmls: str) -> str | None:
    """The first ``vdX`` no disk of these definitions uses."""
    used = {d.target for text in domain_xmls for d in parse_disks(text)}
    return next((t for t in _TARGETS if t not in used), None)


# --- the connection ------------------------------------------------------------------------


class Hypervisor:
    """libvirt on this host. Thread-safe: libvirt connections are, and reconnecting is
    serialised."""

    def __init__(self, uri: str) -> None:
        lv = _lv()
        lv.registerErrorHandler(_quiet, None)
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------

    def connect(self) -> str:
        """Open the connection (if it is not open); returns libvirt's version, e.g. 9.0.0."""
        conn = self._connection()
        version = int(conn.getLibVersion())
        return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"

    def _connection(self) -> Any:
        lv = _lv()
        with self._lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except lv.libvirtError:
                    pass
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()
            try:
                self._conn = lv.open(self.uri)
            except lv.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"cannot connect to libvirt at {self.uri}: {_message(exc)}"
                ) from None
            return self._conn

    def _drop(self, conn: Any) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _call(self, vm: str, fn: Callable[[Any], T], *, retry: bool = True) -> T:
        """``fn(connection)``; a lost connection is opened again (and a read retried once);
        libvirt errors become typed errors."""
        lv = _lv()
        for attempt in (0, 1):
            try:
                conn = self._connection()
            except HypervisorUnavailable as exc:
                raise BusError(ERROR_HYPERVISOR, str(exc), 503) from None
            try:
                return fn(conn)
            except lv.libvirtError as exc:
                if _connection_lost(exc):
                    self._drop(conn)
                    if retry and attempt == 0:
                        continue
                raise _translate(exc, vm) from None
        raise AssertionError("unreachable")

    def _domain(self, conn: Any, vm: str) -> Any:
        return conn.lookupByUUIDString(vm)

    # -- domains -------------------------------------------------------------------------

    def domain_uuids(self) -> set[str]:
        """Every domain libvirt knows here, running or defined."""
        return self._call(
            "-", lambda conn: {str(d.UUIDString()).lower() for d in conn.listAllDomains(0)}
        )

    def is_running(self, vm: str) -> bool:
        return self._call(vm, lambda conn: bool(self._domain(conn, vm).isActive()))

    def disks(self, vm: str) -> list[Disk]:
        """The domain's disks now (the live definition while it runs)."""
        return self._call(vm, lambda conn: parse_disks(self._domain(conn, vm).XMLDesc(0)))

    # -- snapshots -----------------------------------------------------------------------

    def snapshots(self, vm: str) -> list[SnapshotInfo]:
        def work(conn: Any) -> list[SnapshotInfo]:
            dom = self._domain(conn, vm)
            current = parse_disks(dom.XMLDesc(0))
            return [parse_snapshot(s.getXMLDesc(0), current) for s in dom.listAllSnapshots(0)]

        return self._call(vm, work)

    def snapshot(self, vm: str, name: str) -> SnapshotInfo:
        """One snapshot; ``snapshot_not_found`` when the domain has none of that name."""

        def work(conn: Any) -> SnapshotInfo:
            dom = self._domain(conn, vm)
            snap = dom.snapshotLookupByName(name, 0)
            return parse_snapshot(snap.getXMLDesc(0), parse_disks(dom.XMLDesc(0)))

        return self._call(vm, work)

    def plan_snapshot(self, vm: str, name: str, description: str) -> SnapshotPlan:
        """Everything a snapshot needs worked out, so that taking it is one libvirt call."""
        lv = _lv()

        def work(conn: Any) -> SnapshotPlan:
            dom = self._domain(conn, vm)
            try:
                dom.snapshotLookupByName(name, 0)
            except lv.libvirtError as exc:
                if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                    raise
            else:
                raise BusError(
                    ERROR_SNAPSHOT_EXISTS, f"VM {vm} already has a snapshot named {name}", 409
                )
            disks = parse_disks(dom.XMLDesc(0))
            existing = [parse_snapshot(s.getXMLDesc(0), disks) for s in dom.listAllSnapshots(0)]
            overlays = {d.overlay: s.name for s in existing for d in s.disks}
            entries: list[tuple[str, str | None]] = []
            taken: list[SnapshotDisk] = []
            skipped: list[str] = []
            chosen: set[str] = set()
            for disk in disks:
                if not disk.snapshottable:
                    if disk.device == "disk" and not disk.readonly and not disk.restore:
                        skipped.append(f"{disk.target} ({disk.type} storage)")
                    entries.append((disk.target, None))
                    continue
                overlay = overlay_path(disk, name, overlays)
                if str(overlay) in chosen or overlay.exists():
                    overlay = overlay_path(disk, name, overlays, tag=disk.target)
                if str(overlay) in chosen or overlay.exists():
                    raise BusError(
                        ERROR_CONFLICT,
                        f"VM {vm}: {overlay} exists already; remove it or pick another name",
                        409,
                    )
                chosen.add(str(overlay))
                entries.append((disk.target, str(overlay)))
                taken.append(
                    SnapshotDisk(
                        target=disk.target,
                        file=str(disk.source),
                        format=disk.format or "raw",
                        overlay=str(overlay),
                    )
                )
            if not taken:
                raise BusError(
                    ERROR_HYPERVISOR,
                    f"VM {vm} has no writable file-backed disk to snapshot"
                    + (f" (not supported: {', '.join(skipped)})" if skipped else ""),
                    409,
                )
            return SnapshotPlan(
                vm, name, snapshot_xml(name, entries, description), tuple(taken), tuple(skipped)
            )

        return self._call(vm, work)

    def take_snapshot(self, plan: SnapshotPlan) -> None:
        """The snapshot itself: one atomic disk-only external snapshot (with metadata)."""
        lv = _lv()
        flags = lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        self._call(
            plan.vm,
            lambda conn: self._domain(conn, plan.vm).snapshotCreateXML(plan.xml, flags),
            retry=False,
        )

    def delete_snapshot(self, vm: str, name: str) -> None:
        """libvirt merges the snapshot's overlay into the image below it (block commit, and
        a pivot when the disk is writing to that overlay) and removes the overlay file."""

        def work(conn: Any) -> None:
            self._domain(conn, vm).snapshotLookupByName(name, 0).delete(0)

        self._call(vm, work, retry=False)

    # -- restore disks -------------------------------------------------------------------

    def attach_restore_disk(self, vm: str, file: str, fmt: str) -> tuple[str, str]:
        """Attach ``file`` read-only to the running domain (live only: gone when QEMU stops);
        returns (target, serial)."""
        lv = _lv()

        def work(conn: Any) -> tuple[str, str]:
            dom = self._domain(conn, vm)
            if not dom.isActive():
                raise BusError(ERROR_NOT_RUNNING, f"VM {vm} is not running", 409)
            target = free_target(dom.XMLDesc(0), dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
            if target is None:
                raise BusError(ERROR_CONFLICT, f"VM {vm} has no free virtio disk name", 409)
            serial = RESTORE_SERIAL_PREFIX + secrets.token_hex(4)
            xml = restore_disk_xml(file, fmt, target, serial)
            dom.attachDeviceFlags(xml, lv.VIR_DOMAIN_AFFECT_LIVE)
            return target, serial

        return self._call(vm, work, retry=False)

    def restore_disk(self, vm: str, serial: str) -> Disk | None:
        """The attached restore disk with this serial; None when the domain does not run or
        has no such disk (live attachments vanish when QEMU stops)."""

        def work(conn: Any) -> Disk | None:
            dom = self._domain(conn, vm)
            if not dom.isActive():
                return None
            return next((d for d in parse_disks(dom.XMLDesc(0)) if d.serial == serial), None)

        return self._call(vm, work)

    def detach_restore_disk(self, vm: str, serial: str, timeout: float) -> bool:
        """Unplug the restore disk and wait (``timeout``) until the guest let it go. False
        when it was not attached (any more); a ``timeout`` error when the guest holds on to
        it (the unplug request stays pending in QEMU)."""
        lv = _lv()
        disk = self.restore_disk(vm, serial)
        if disk is None:
            return False
        started = time.monotonic()

        def unplug(conn: Any) -> None:
            try:
                self._domain(conn, vm).detachDeviceFlags(disk.xml, lv.VIR_DOMAIN_AFFECT_LIVE)
            except lv.libvirtError as exc:
                text = _message(exc)
                if "unplug" in text and ("in the process" in text or "already" in text):
                    return  # an earlier request is still pending: wait for it
                if exc.get_error_code() == lv.VIR_ERR_DEVICE_MISSING:
                    return
                if exc.get_error_code() == lv.VIR_ERR_OPERATION_INVALID and not self._active(
                    conn, vm
                ):
                    return  # stopped meanwhile: the disk went with QEMU
                raise

        self._call(vm, unplug, retry=False)
        while True:
            if self.restore_disk(vm, serial) is None:
                return True
            if time.monotonic() - started > timeout:
                raise BusError(
                    errors.TIMEOUT,
                    f"VM {vm} did not release restore disk {disk.target} (serial {serial}) "
                    f"within {timeout:.0f} s: it is probably still mounted or in use in the "
                    "guest. The unplug request stays pending and completes when the guest lets "
                    "go; the attachment is kept until then (detach again to check).",
                    504,
                )
            time.sleep(DETACH_POLL)

    def _active(self, conn: Any, vm: str) -> bool:
        try:
            return bool(self._domain(conn, vm).isActive())
        except Exception:
            return False
