"""Snapshots through the host adapter, on real libvirt domains (no guest OS needed): what
libvirt, the files, the KV record and the events show; deleting keeps the VM's data; a VM
reaches only its own snapshots; wrong requests get typed errors; quiescing with an agent that
freezes, fails, is late or thaws by itself."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from guestbus.contract import (
    HEADER_VM,
    HV_RESTORE_ATTACH,
    HV_RESTORE_DETACH,
    HV_SNAPSHOT_CREATE,
    HV_SNAPSHOT_DELETE,
    HV_SNAPSHOT_LIST,
    Consistency,
    FreezeResult,
    ScriptOutcome,
    ScriptState,
    SnapshotDeleteReply,
    SnapshotListReply,
    SnapshotRecord,
    ThawResult,
    guest_subject,
)

from ..support.waiting import wait_until
from ._support import CAPABILITIES, HvStack, TinyVM, qemu_img, qemu_io

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MakeVm = Callable[..., TinyVM]
MIB = 1024 * 1024


async def create(stack: HvStack, vm: TinyVM, **body: Any) -> SnapshotRecord:
    return (await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, body)).ok(SnapshotRecord)


async def listed(stack: HvStack, vm: TinyVM) -> dict[str, SnapshotRecord]:
    reply = (await stack.call(vm.uuid, HV_SNAPSHOT_LIST)).ok(SnapshotListReply)
    return {s.name: s for s in reply.snapshots}


async def test_create_list_delete_and_the_data_stays_whole(
    stack: HvStack, make_vm: MakeVm, figures: dict[str, Any]
) -> None:
    vm = make_vm(pattern=0xAB)
    stack.show(vm)
    await stack.start_bridge()
    await stack.wait_served(vm)

    # crash-consistent (no quiesce asked): one atomic libvirt snapshot, the disk moves on
    s1 = await create(stack, vm, name="s1")
    overlay1 = vm.dir / "disk.s1.qcow2"
    assert s1.consistency is Consistency.CRASH and s1.reasons == ["not requested"]
    assert not s1.quiesce_requested and s1.freeze is None and s1.thaw is None
    assert [(s.step, s.ok) for s in s1.steps] == [("snapshot", True)]
    assert [(d.target, d.file, d.format, d.overlay) for d in s1.disks] == [
        ("vda", str(vm.disk), "qcow2", str(overlay1))
    ]
    assert s1.host == stack.host and s1.vm == vm.uuid
    assert vm.snapshot_names() == ["s1"]
    assert vm.live_disks() == {"vda": str(overlay1)}  # the CD-ROM has no source
    assert overlay1.is_file()
    assert await stack.snapshot_record(vm.uuid, "s1") == s1
    await wait_until(lambda: bool(stack.events_of(vm.uuid, "created")), 5, "created event")
    event = stack.events_of(vm.uuid, "created")[0]
    assert (event.name, event.consistency, event.host) == ("s1", Consistency.CRASH, stack.host)
    figures["snapshot create (libvirt call)"] = f"{s1.steps[0].seconds * 1000:.0f} ms"

    # the guest writes after s1, and after s2 (written here while it is off: no OS inside)
    vm.stop()
    qemu_io(overlay1, f"write -P 0xcd {1 * MIB} 1M")
    vm.start()
    s2 = await create(stack, vm, name="s2")
    overlay2 = vm.dir / "disk.s2.qcow2"  # named after the original image, not disk.s1.s2
    assert [(d.file, d.overlay) for d in s2.disks] == [(str(overlay1), str(overlay2))]
    vm.stop()
    qemu_io(overlay2, f"write -P 0xef {2 * MIB} 1M")
    vm.start()

    snaps = await listed(stack, vm)
    assert list(snaps) == ["s1", "s2"]
    assert snaps["s1"].disks == s1.disks and snaps["s2"].disks == s2.disks
    assert snaps["s1"].steps == s1.steps  # the details come from the record

    # what the guest sees now, read through the whole chain while it runs
    reference = vm.dir / "reference.raw"
    qemu_img("convert", "-U", "-O", "raw", str(overlay2), str(reference))

    # deleting the older snapshot of a running VM: its overlay is merged into the image below
    started = time.monotonic()
    deleted = (await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": "s1"})).ok(
        SnapshotDeleteReply
    )
    figures["snapshot delete (running, 1 MiB merged)"] = f"{time.monotonic() - started:.2f} s"
    assert deleted.name == "s1" and deleted.deleted
    assert vm.snapshot_names() == ["s2"] and not overlay1.exists()
    assert await stack.snapshot_record(vm.uuid, "s1") is None
    # s2's content is now read from the image s1's overlay was merged into
    assert [(d.file, d.overlay) for d in (await listed(stack, vm))["s2"].disks] == [
        (str(vm.disk), str(overlay2))
    ]
    # and the newest, whose overlay the VM is writing to: merged, the disk pivots back
    assert (await stack.call(vm.uuid, HV_SNAPSHOT_DELETE, {"name": "s2"})).error is None
    assert vm.snapshot_names() == [] and vm.live_disks() == {"vda": str(vm.disk)}
    assert sorted(p.name for p in vm.dir.glob("*.qcow2")) == ["disk.qcow2"]
    assert await listed(stack, vm) == {}
    await wait_until(lambda: len(stack.events_of(vm.uuid, "deleted")) == 2, 5, "deleted events")

    # not one byte of the guest's data was lost on the way
    vm.stop()
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(reference), str(vm.disk))
    qemu_io(vm.disk, "read -P 0xab 0 1M")
    qemu_io(vm.disk, f"read -P 0xcd {1 * MIB} 1M")
    qemu_io(vm.disk, f"read -P 0xef {2 * MIB} 1M")


async def test_names_a_clash_and_a_snapshot_taken_outside_guestbus(
    stack: HvStack, make_vm: MakeVm, hv_conn: Any
) -> None:
    vm = make_vm()
    stack.show(vm)
    await stack.start_bridge()
    await stack.wait_served(vm)

    auto = await create(stack, vm)
    assert re.fullmatch(r"snap-\d{8}T\d{6}Z", auto.name), auto.name
    clash = await stack.call(vm.uuid, HV_SNAPSHOT_CREATE, {"name": auto.name})
    assert clash.code == "snapshot_exists" and clash.error is not None
    assert clash.error.status == 409 and auto.name in clash.error.message
    assert vm.snapshot_names() == [auto.name]

    # someone takes one with virsh: listed, as nothing better than crash-consistent
    import libvirt as lv

    outside = vm.dir / "disk.manual.qcow2"
    vm.dom.snapshotCreateXML(
        "<domainsnapshot><name>manual</name><disks><disk name='vda' snapshot='external'>"
        f"<source file='{outside}'/></disk><disk name='hdc' snapshot='no'/></disks>"
        "</domainsnapshot>",
        lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
    )
    snaps = await listed(stack, vm)
    assert set(snaps) == {auto.name, "manual"}
    manual = snaps["manual"]
    assert manual.consistency is Consistency.CRASH and manual.reasons == ["taken outside guestbus"]
    assert [(d.target, d.overlay) for d in manual.disks] == [("vda", str(outside))]


async def test_a_vm_reaches_only_its_own_snapshots(stack: HvStack, make_vm: MakeVm) -> None:
    a, b = make_vm(), make_vm()
    for vm in (a, b):
        stack.show(vm)
    await stack.start_bridge()
    for vm in (a, b):
        await stack.wait_served(vm)
    await create(stack, b, name="only-b")

    # A names B's snapshot: its adapter looks in A's domain only
    for op, body in (
        (HV_RESTORE_ATTACH, {"snapshot": "only-b"}),
        (HV_SNAPSHOT_DELETE, {"name": "only-b"}),
    ):
        reply = await stack.call(a.uuid, op, body)
        assert reply.code == "snapshot_not_found", (op, reply)
    assert await listed(stack, a) == {}
    # a payload or header naming B changes nothing: the subject names the VM
    reply = await stack.call(
        a.uuid, HV_SNAPSHOT_DELETE, {"name": "only-b"}, headers={HEADER_VM: b.uuid}
    )
    assert reply.code == "bad_request" and HEADER_VM in str(reply.error)
    assert b.snapshot_names() == ["only-b"] and list(await listed(stack, b)) == ["only-b"]


async def test_wrong_requests_get_typed_errors_and_change_nothing(
    stack: HvStack, make_vm: MakeVm
) -> None:
    vm = make_vm()
    off = make_vm(start=False)
    for v in (vm, off):
        stack.show(v)
    await stack.start_bridge()
    for v in (vm, off):
        await stack.wait_served(v)

    cases: list[tuple[str, str, Any, str]] = [
        (vm.uuid, HV_SNAPSHOT_CREATE, {"name": "no spaces"}, "bad_request"),
        (vm.uuid, HV_SNAPSHOT_CREATE, {"name": "x" * 65}, "bad_request"),
        (vm.uuid, HV_SNAPSHOT_CREATE, {"quiesce": "maybe"}, "bad_request"),
        (vm.uuid, HV_SNAPSHOT_CREATE, {"freeze_deadline": 0}, "bad_request"),
        (vm.uuid, HV_SNAPSHOT_CREATE, {"what": 1}, "bad_request"),
        (vm.uuid, HV_SNAPSHOT_DELETE, {}, "bad_request"),
        (vm.uuid, HV_SNAPSHOT_DELETE, {"name": "missing"}, "snapshot_not_found"),
        (vm.uuid, HV_RESTORE_ATTACH, {"snapshot": "missing"}, "snapshot_not_found"),
        (vm.uuid, HV_RESTORE_ATTACH, {"snapshot": "s", "ttl": -1}, "bad_request"),
        (vm.uuid, HV_RESTORE_DETACH, {"label": "missing"}, "not_found"),
        (off.uuid, HV_SNAPSHOT_CREATE, {"quiesce": True}, "vm_not_running"),
    ]
    for uuid, op, body, code in cases:
        reply = await stack.call(uuid, op, body)
        assert reply.code == code, (op, body, reply)
        assert (
            reply.error is not None and reply.error.message and "Traceback" not in str(reply.error)
        )
    # not JSON, an operation that does not exist
    assert stack.nc is not None
    raw = await stack.nc.request(f"gb.hv.{vm.uuid}.{HV_SNAPSHOT_LIST}", b"{", timeout=10)
    assert raw.data  # a list ignores its (empty) body: answered, not crashed
    reply = await stack.call(vm.uuid, "", subject=f"gb.hv.{vm.uuid}.rollback")
    assert reply.code == "unknown_method"
    bad = await stack.nc.request(f"gb.hv.{vm.uuid}.{HV_SNAPSHOT_CREATE}", b"{", timeout=10)
    assert json.loads(bad.data)["code"] == "bad_request"
    assert vm.snapshot_names() == [] and off.snapshot_names() == []

    # a shut-off VM: a snapshot is fine (crash-consistent), a restore disk is not
    taken = await create(stack, off, name="cold")
    assert taken.consistency is Consistency.CRASH and off.snapshot_names() == ["cold"]
    reply = await stack.call(off.uuid, HV_RESTORE_ATTACH, {"snapshot": "cold"})
    assert reply.code == "vm_not_running" and reply.error is not None
    assert reply.error.status == 409


async def test_only_libvirt_domains_are_served_and_vanished_ones_no_longer(
    stack: HvStack, make_vm: MakeVm
) -> None:
    vm = make_vm()
    stack.show(vm)
    # a VM the bridge finds that libvirt does not know (e.g. a lab VM): no adapter for it
    stranger = TinyVM(vm.conn)
    stack.show(stranger)
    await stack.start_bridge()
    await stack.wait_served(vm)

    async def recorded(uuid: str) -> bool:
        return await stack.record(uuid) is not None

    await wait_until(lambda: recorded(stranger.uuid), 5, "the stranger's record")
    record = await stack.record(stranger.uuid)
    assert record is not None and record.host_capabilities == []
    with pytest.raises(NoRespondersError):
        await stack.call(stranger.uuid, HV_SNAPSHOT_LIST, timeout=2)

    # the VM's XML goes (undefined, moved away): the adapter stops answering for it
    stack.hide(vm)

    async def unserved() -> bool:
        try:
            await stack.call(vm.uuid, HV_SNAPSHOT_LIST, timeout=2)
        except NoRespondersError:
            return True
        return False

    await wait_until(unserved, 10, "the adapter to stop serving the VM", 0.2)


async def test_without_libvirt_the_bridge_works_on(stack: HvStack, make_vm: MakeVm) -> None:
    vm = make_vm(start=False)
    stack.show(vm)
    service = await stack.start_bridge(libvirt_uri="")
    assert service.adapter.state == "off"

    async def recorded() -> bool:
        return await stack.record(vm.uuid) is not None

    await wait_until(recorded, 5, "the VM recorded")
    record = await stack.record(vm.uuid)
    assert record is not None and record.host_capabilities == []
    with pytest.raises(NoRespondersError):
        await stack.call(vm.uuid, HV_SNAPSHOT_LIST, timeout=2)
    await stack.stop_bridge()

    # an unreachable libvirt: the same, and the bridge is ready all the same
    service = await stack.start_bridge(libvirt_uri="qemu+unix:///system?socket=/nonexistent")
    assert service.adapter.state == "waiting" and stack.bridge is not None
    assert stack.bridge.ready
    await stack.stop_bridge()

    # with libvirt again, the record says what the host can do
    await stack.start_bridge()
    await stack.wait_served(vm)
    record = await stack.record(vm.uuid)
    assert record is not None and record.host_capabilities == CAPABILITIES


# --- quiescing: an agent stand-in on the bus answers freeze and thaw --------------------------


class FakeAgent:
    """Answers ``gb.guest.<vm>.freeze`` / ``thaw`` as an agent would, and notes what it saw."""

    def __init__(self, stack: HvStack, vm: TinyVM) -> None:
        self.stack = stack
        self.vm = vm
        self.calls: list[str] = []
        self.snapshots_at_thaw: list[str] = []
        self.freeze_delay = 0.0
        self.deadline = 10.0
        self.self_thawed = False
        self.pre_freeze = ScriptState.OK

    async def start(self) -> None:
        assert self.stack.nc is not None
        for method in ("freeze", "thaw"):
            await self.stack.nc.subscribe(guest_subject(self.vm.uuid, method), cb=self.on_msg)
        await self.stack.nc.flush()

    async def on_msg(self, msg: Msg) -> None:
        method = msg.subject.rsplit(".", 1)[-1]
        self.calls.append(method)
        if method == "freeze":
            params = json.loads(msg.data)
            assert 0 < params["deadline"] <= 600 and params["snapshot"]
            await asyncio.sleep(self.freeze_delay)
            consistency = (
                Consistency.APPLICATION
                if self.pre_freeze is ScriptState.OK
                else Consistency.FILESYSTEM
            )
            result: Any = FreezeResult(
                frozen=["/", "/var"],
                consistency=consistency,
                pre_freeze=ScriptOutcome(path="/usr/local/sbin/pre_freeze", state=self.pre_freeze),
                seconds=0.01,
                deadline_seconds=self.deadline,
            )
        else:
            self.snapshots_at_thaw = self.vm.snapshot_names()
            result = ThawResult(
                thawed=["/var", "/"],
                post_thaw=ScriptOutcome(path="/usr/local/sbin/post_thaw", state=ScriptState.OK),
                frozen_seconds=0.05,
                self_thawed=self.self_thawed,
            )
        await msg.respond(result.model_dump_json().encode())


async def test_quiesced_snapshots(stack: HvStack, make_vm: MakeVm) -> None:
    vm = make_vm()
    stack.show(vm)
    await stack.start_bridge(freeze_timeout=1.0)
    await stack.wait_served(vm)

    # no agent linked: freeze fails at once, the snapshot goes on crash-consistent, no thaw
    rec = await create(stack, vm, name="q0", quiesce=True)
    assert rec.quiesce_requested and rec.consistency is Consistency.CRASH
    assert [(s.step, s.ok) for s in rec.steps] == [("freeze", False), ("snapshot", True)]
    assert "no_active_link" in rec.reasons[0]

    agent = FakeAgent(stack, vm)
    await agent.start()
    # freeze → snapshot → thaw, the snapshot inside the window
    rec = await create(stack, vm, name="q1", quiesce=True, freeze_deadline=30)
    assert agent.calls == ["freeze", "thaw"] and "q1" in agent.snapshots_at_thaw
    assert rec.consistency is Consistency.APPLICATION and rec.reasons == []
    assert [(s.step, s.ok) for s in rec.steps] == [
        ("freeze", True),
        ("snapshot", True),
        ("thaw", True),
    ]
    assert rec.freeze is not None and rec.freeze.frozen == ["/", "/var"]
    assert rec.thaw is not None and rec.frozen_seconds == 0.05
    assert await stack.snapshot_record(vm.uuid, "q1") == rec

    # no usable pre_freeze: file systems only, and why
    agent.pre_freeze = ScriptState.MISSING
    rec = await create(stack, vm, name="q2", quiesce=True)
    assert rec.consistency is Consistency.FILESYSTEM and rec.reasons == ["pre_freeze missing"]
    agent.pre_freeze = ScriptState.OK

    # the guest had thawed by itself before the snapshot (its deadline was shorter than the
    # way there): only crash-consistent
    agent.deadline, agent.self_thawed = 0.5, True
    rec = await create(stack, vm, name="q3", quiesce=True)
    assert rec.consistency is Consistency.CRASH
    assert "thawed by itself" in rec.reasons[-1]

    # a freeze that answers too late: the snapshot goes on, and a thaw is sent all the same
    agent.calls.clear()
    agent.freeze_delay, agent.deadline, agent.self_thawed = 3.5, 10.0, False
    rec = await create(stack, vm, name="q4", quiesce=True)
    assert rec.consistency is Consistency.CRASH and "timeout" in rec.reasons[0]
    assert [(s.step, s.ok) for s in rec.steps] == [
        ("freeze", False),
        ("snapshot", True),
        ("thaw", True),
    ]
    await wait_until(lambda: agent.calls == ["freeze", "thaw"], 5, "the late freeze and thaw")
    assert vm.snapshot_names() == ["q0", "q1", "q2", "q3", "q4"]
