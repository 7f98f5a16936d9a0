"""Restore disks through the host adapter, on real libvirt domains: attached read-only, live
only, found by serial; detached on request, when due, after a restart of the bridge, or
forgotten when the VM stopped; a guest that holds on to one gets a clear error.

Hot-unplug needs a guest kernel to acknowledge it: these guests boot the e2e image's kernel to
a shell in its initramfs (a few seconds under TCG). No agent runs, so the unmount asked before
a detach finds nobody (``unmounted`` is None)."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest

from guestbus.contract import (
    HEADER_HOST,
    HEADER_LINK,
    HEADER_VM,
    HV_RESTORE_ATTACH,
    HV_RESTORE_DETACH,
    HV_RESTORE_LIST,
    HV_SNAPSHOT_CREATE,
    HV_SNAPSHOT_DELETE,
    RESTORE_SERIAL_PREFIX,
    RestoreAttachment,
    RestoreDetachReply,
    RestoreListReply,
    SnapshotRecord,
)

from ..support.waiting import wait_until
from ._support import BIOS, KERNEL, HvStack, TinyVM

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MakeVm = Callable[..., TinyVM]


def restore_disks(vm: TinyVM) -> dict[str, tuple[str, str, bool]]:
    """serial → (target, source file, read-only) of the restore disks in the live XML."""
    found = {}
    for disk in ET.fromstring(vm.dom.XMLDesc(0)).iterfind("./devices/disk"):
        serial = disk.findtext("serial") or ""
        if serial.startswith(RESTORE_SERIAL_PREFIX):
            target, source = disk.find("target"), disk.find("source")
            assert target is not None and source is not None
            found[serial] = (
                str(target.get("dev")),
                str(source.get("file")),
                disk.find("readonly") is not None,
            )
    return found


def in_persistent_xml(vm: TinyVM, serial: str) -> bool:
    import libvirt

    return serial in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


async def attach(stack: HvStack, vm: TinyVM, snapshot: str, **body: Any) -> RestoreAttachment:
    reply = await stack.call(vm.uuid, HV_RESTORE_ATTACH, {"snapshot": snapshot, **body})
    return reply.ok(RestoreAttachment)


async def attached(stack: HvStack, vm: TinyVM) -> list[RestoreAttachment]:
    return (await stack.call(vm.uuid, HV_RESTORE_LIST)).ok(RestoreListReply).attachments


async def test_attach_detach_and_detach_when_due(
    stack: HvStack, make_vm: MakeVm, kernel_image: Any, figures: dict[str, Any]
) -> None:
    vm = make_vm(KERNEL, image=kernel_image)
    stack.show(vm)
    await stack.start_bridge()
    await stack.wait_served(vm)
    (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": "s1"})).ok(SnapshotRecord)

    # as rpc-router forwards a guest's request: the link headers say who asked
    guest = {HEADER_VM: vm.uuid, HEADER_LINK: "serial", HEADER_HOST: stack.host}
    started = time.monotonic()
    reply = await stack.call(vm.uuid, HV_RESTORE_ATTACH, {"snapshot": "s1"}, headers=guest)
    figures["restore disk attach"] = f"{(time.monotonic() - started) * 1000:.0f} ms"
    att = reply.ok(RestoreAttachment)
    assert (att.label, att.snapshot, att.target, att.requested_by) == ("s1", "s1", "vdb", "guest")
    assert att.serial.startswith(RESTORE_SERIAL_PREFIX) and len(att.serial) == 14
    assert att.file == str(vm.disk) and att.host == stack.host
    ttl = (att.detach_at - att.attached_at).total_seconds()
    assert abs(ttl - 24 * 3600) < 1, ttl  # the default, at most
    # read-only, live only: the next start of the VM does not have it
    assert restore_disks(vm) == {att.serial: ("vdb", str(vm.disk), True)}
    assert not in_persistent_xml(vm, att.serial)
    assert await stack.restore_record(vm.uuid, "s1") == att

    # asking again changes nothing; the list shows it
    assert await attach(stack, vm, "s1") == att
    assert await attached(stack, vm) == [att]

    # while it is attached its snapshot cannot go (its image would be rewritten)
    reply = await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": "s1"})
    assert reply.code == "conflict" and "restore disk s1" in str(reply.error)
    # a new snapshot leaves the restore disk alone (only vda gets an overlay)
    s2 = (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": "s2"})).ok(SnapshotRecord)
    assert [d.target for d in s2.disks] == ["vda"]
    assert restore_disks(vm) == {att.serial: ("vdb", str(vm.disk), True)}
    # s2 reads through s1's image: deleting s1 is refused while s2 is attached, too
    att2 = await attach(stack, vm, "s2")
    assert att2.target == "vdc" and att2.file == str(vm.dir / "disk.s1.qcow2")

    started = time.monotonic()
    reply = await stack.call(vm.uuid, HV_RESTORE_DETACH, {"label": "s1"})
    figures["restore disk detach (guest kernel acknowledges)"] = (
        f"{(time.monotonic() - started) * 1000:.0f} ms"
    )
    detached = reply.ok(RestoreDetachReply)
    assert detached.label == "s1" and detached.detached and detached.unmounted is None
    assert list(restore_disks(vm)) == [att2.serial]
    assert await stack.restore_record(vm.uuid, "s1") is None
    reply = await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": "s1"})
    assert reply.code == "conflict" and "restore disk s2" in str(reply.error)
    assert (await stack.call(vm.uuid, HV_RESTORE_DETACH, {"label": "s2"})).error is None
    assert (await stack.call(vm.uuid, HV_RESTORE_DETACH, {"label": "s2"})).code == "not_found"
    assert (await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": "s1"})).error is None

    # a short time to live: detached by the adapter when it is up
    short = await attach(stack, vm, "s2", ttl=1.0)
    assert (short.detach_at - short.attached_at).total_seconds() == pytest.approx(1.0, abs=0.01)
    await wait_until(
        lambda: bool(stack.events_of(vm.uuid, "auto_detached")), 15, "the automatic detach"
    )
    assert restore_disks(vm) == {} and await attached(stack, vm) == []
    assert await stack.restore_record(vm.uuid, "s2") is None
    actions = [(e.action, e.name) for e in stack.events_of(vm.uuid) if e.action != "created"]
    assert actions == [
        ("attached", "s1"),
        ("attached", "s2"),
        ("detached", "s1"),
        ("detached", "s2"),
        ("deleted", "s1"),
        ("attached", "s2"),
        ("auto_detached", "s2"),
    ], actions


async def test_every_disk_of_a_snapshot_can_be_attached(
    stack: HvStack, make_vm: MakeVm, kernel_image: Any
) -> None:
    """A VM with a data disk: one snapshot covers both; either disk (or both at once) is
    attached, each under its own label; a disk the snapshot does not have is named back."""
    vm = make_vm(KERNEL, image=kernel_image, data_disk=True)
    assert vm.data is not None
    stack.show(vm)
    await stack.start_bridge()
    await stack.wait_served(vm)
    snap = (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": "two"})).ok(SnapshotRecord)
    assert [d.target for d in snap.disks] == ["vda", "vdb"]

    data = await attach(stack, vm, "two", disk="vdb")
    assert (data.label, data.snapshot, data.disk) == ("two-vdb", "two", "vdb")
    assert data.file == str(vm.data) and data.target == "vdc"
    boot = await attach(stack, vm, "two")  # the first disk, as before
    assert (boot.label, boot.disk, boot.file, boot.target) == ("two", "vda", str(vm.disk), "vdd")
    assert restore_disks(vm) == {
        data.serial: ("vdc", str(vm.data), True),
        boot.serial: ("vdd", str(vm.disk), True),
    }
    assert await attach(stack, vm, "two", disk="vdb") == data  # idempotent per disk
    assert await stack.restore_record(vm.uuid, "two-vdb") == data
    # a snapshot whose own name is that label cannot take it over
    (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": "two-vdb"})).ok(SnapshotRecord)
    reply = await stack.call(vm.uuid, HV_RESTORE_ATTACH, {"snapshot": "two-vdb"})
    assert reply.code == "conflict" and "taken by the restore disk of snapshot two" in str(
        reply.error
    )

    reply = await stack.call(vm.uuid, HV_RESTORE_ATTACH, {"snapshot": "two", "disk": "vdz"})
    assert reply.code == "bad_request" and "its disks: vda, vdb" in str(reply.error)
    reply = await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": "two"})
    assert reply.code == "conflict"

    for label in ("two-vdb", "two"):
        assert (await stack.call(vm.uuid, HV_RESTORE_DETACH, {"label": label})).error is None
    assert restore_disks(vm) == {}
    for name in ("two-vdb", "two"):
        assert (await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": name})).error is None


async def test_restore_disks_outlive_a_bridge_restart_and_not_the_vm(
    stack: HvStack, make_vm: MakeVm, kernel_image: Any
) -> None:
    vm = make_vm(KERNEL, image=kernel_image)
    stack.show(vm)
    await stack.start_bridge()
    await stack.wait_served(vm)
    for name in ("s1", "s2"):
        (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": name})).ok(SnapshotRecord)
    due = await attach(stack, vm, "s1", ttl=4.0)
    later = await attach(stack, vm, "s2")

    # the bridge goes away: the disks stay attached, their records in KV
    await stack.stop_bridge()
    assert set(restore_disks(vm)) == {due.serial, later.serial}
    assert await stack.restore_record(vm.uuid, "s1") == due

    # the next bridge knows them, and detaches the one that is due
    await stack.start_bridge()
    await stack.wait_served(vm)
    assert {a.label for a in await attached(stack, vm)} == {"s1", "s2"}
    await wait_until(
        lambda: bool(stack.events_of(vm.uuid, "auto_detached")), 20, "s1 detached when due"
    )
    assert set(restore_disks(vm)) == {later.serial}
    assert await stack.restore_record(vm.uuid, "s1") is None
    assert [a.label for a in await attached(stack, vm)] == ["s2"]

    # the VM stops: live attachments end with QEMU, the record goes too
    vm.stop()
    await wait_until(
        lambda: len(stack.events_of(vm.uuid, "auto_detached")) == 2, 10, "s2 forgotten"
    )
    gone = stack.events_of(vm.uuid, "auto_detached")[-1]
    assert gone.name == "s2" and gone.detail is not None and "stopped" in gone.detail
    assert await stack.restore_record(vm.uuid, "s2") is None
    reply = await stack.call(vm.uuid, HV_RESTORE_ATTACH, {"snapshot": "s2"})
    assert reply.code == "vm_not_running"


async def test_a_guest_that_does_not_let_go_gets_a_clear_error(
    stack: HvStack, make_vm: MakeVm
) -> None:
    # no guest OS: nothing acknowledges the unplug, like a guest that keeps the disk busy
    vm = make_vm(BIOS)
    stack.show(vm)
    await stack.start_bridge(detach_timeout=1.0)
    await stack.wait_served(vm)
    (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": "s1"})).ok(SnapshotRecord)
    att = await attach(stack, vm, "s1")
    assert restore_disks(vm) == {att.serial: ("vdb", str(vm.disk), True)}

    reply = await stack.call(vm.uuid, HV_RESTORE_DETACH, {"label": "s1"})
    assert reply.code == "timeout" and reply.error is not None and reply.error.status == 504
    assert "did not release restore disk vdb" in reply.error.message
    # still attached, still recorded, still listed: asking again is possible
    assert list(restore_disks(vm)) == [att.serial]
    assert await stack.restore_record(vm.uuid, "s1") == att
    assert await attached(stack, vm) == [att]
    # another VM is not held up meanwhile (other threads, another lock)
    other = make_vm(BIOS)
    stack.show(other)
    await stack.wait_served(other)
    again = asyncio.ensure_future(stack.call(vm.uuid, HV_RESTORE_DETACH, {"label": "s1"}))
    await asyncio.sleep(0.5)
    quick = await stack.call(other.uuid, HV_SNAPSHOT_CREATE, {"name": "meanwhile"})
    assert quick.error is None and quick.seconds < 2.0 and not again.done(), quick
    assert (await again).code == "timeout"
    # the VM is switched off: the disk is gone with it, and so is the record
    vm.stop()
    await wait_until(
        lambda: bool(stack.events_of(vm.uuid, "auto_detached")), 10, "the record forgotten"
    )
    assert await stack.restore_record(vm.uuid, "s1") is None
