"""The host adapter under test: real libvirt and QEMU, a real nats-server, the serial-bridge
in-process.

Domains are tiny and need no guest OS: a 16 MiB qcow2 disk under TCG that sits in the BIOS
(:data:`BIOS`) is enough for snapshots; hot-unplug of a virtio disk needs a guest kernel to
acknowledge it, so :data:`KERNEL` guests boot the e2e image's kernel and initrd straight to a
shell in the initramfs (``rdinit=/bin/sh``, a few seconds under TCG), which does.

The bridge discovers the test's domains only: their XML (uuid, name, a serial port whose
socket never exists, so no link is attempted) is written to a directory of the test's own,
its only ``libvirt_xml_dirs``, so guests of another run on this host are never touched.
Everything is named ``gbe2e-hv-*`` (``libvirt_harness.cleanup_stale()`` knows the prefix).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from guestbus.contract import (
    EVT_PREFIX,
    EVT_SNAPSHOT,
    KV_RESTORES,
    KV_SNAPSHOTS,
    KV_VMS,
    RestoreAttachment,
    SnapshotEvent,
    SnapshotRecord,
    VmRecord,
    hv_subject,
)
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusError, ServiceHost
from guestbus_serial_bridge.service import SerialBridge
from guestbus_serial_bridge.settings import BridgeSettings

from ..e2e import libvirt_harness as harness
from ..support.waiting import wait_until

M = TypeVar("M", bound=BaseModel)

PREFIX: str = harness.NAME_PREFIX + "hv-"
BIOS = "bios"
KERNEL = "kernel"
CAPABILITIES = ["snapshot", "restore"]
SHELL_READY = "Run /bin/sh as init process"
"""What the kernel prints when it hands over to the initramfs shell (ACPI hot-plug is up)."""


# --- domains ----------------------------------------------------------------------------------


def qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    return proc.stdout


def qemu_io(image: Path, command: str, *, share: bool = False) -> str:
    argv = ["qemu-io", *(["-U"] if share else []), "-c", command, str(image)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or "Pattern verification failed" in proc.stdout + proc.stderr:
        raise AssertionError(f"qemu-io {command!r} on {image}: {proc.stdout}{proc.stderr}")
    return proc.stdout


class TinyVM:
    """A libvirt domain with one 16 MiB qcow2 disk (and a second one, ``data_disk``), no
    network, nothing else to speak of."""

    def __init__(
        self, conn: Any, kind: str = BIOS, image: Any = None, *, data_disk: bool = False
    ) -> None:
        self.conn = conn
        self.kind = kind
        self.image = image
        self.name = PREFIX + secrets.token_hex(4)
        self.uuid = str(uuidlib.uuid4())
        self.dir = Path(harness.vm_root()) / self.name
        self.disk = self.dir / "disk.qcow2"
        self.data = self.dir / "data.qcow2" if data_disk else None
        self.console = self.dir / "console.log"
        self.dom: Any = None

    def xml(self) -> str:
        boot = ""
        if self.kind == KERNEL:
            assert self.image is not None
            boot = (
                f"<kernel>{self.image.kernel}</kernel><initrd>{self.image.initrd}</initrd>"
                "<cmdline>console=ttyS0 rdinit=/bin/sh panic=-1</cmdline>"
            )
        memory = 256 if self.kind == KERNEL else 32
        data = ""
        if self.data is not None:
            data = f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{self.data}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>"""
        return f"""<domain type='qemu'>
  <name>{self.name}</name><uuid>{self.uuid}</uuid>
  <memory unit='MiB'>{memory}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <features><acpi/><tcg><tb-cache unit='MiB'>32</tb-cache></tcg></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{self.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>{data}
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <serial type='file'><source path='{self.console}'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>"""

    def discovery_xml(self) -> str:
        """What the bridge reads: the domain's identity and a serial port 1 whose socket
        never exists (no link is attempted)."""
        return (
            f"<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid><devices>"
            f"<serial type='unix'><source mode='bind' path='/nonexistent/{self.uuid}.serial.1'/>"
            "<target port='1'/></serial></devices></domain>"
        )

    def create(self, pattern: int | None = None) -> TinyVM:
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        qemu_img("create", "-q", "-f", "qcow2", str(self.disk), "16M")
        if pattern is not None:
            qemu_io(self.disk, f"write -P {pattern:#x} 0 1M")
        if self.data is not None:
            qemu_img("create", "-q", "-f", "qcow2", str(self.data), "16M")
        self.dom = self.conn.defineXML(self.xml())
        return self

    def start(self) -> None:
        self.dom.create()
        if self.kind == KERNEL:
            deadline = time.monotonic() + 120
            while SHELL_READY not in self.console_text():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: no shell:\n{self.console_text()[-2000:]}")
                time.sleep(0.1)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.dom is not None and self.dom.isActive():
            self.dom.destroy()

    def live_disks(self) -> dict[str, str]:
        """target → source file of the domain's disks now."""
        import xml.etree.ElementTree as ET

        root = ET.fromstring(self.dom.XMLDesc(0))
        found = {}
        for disk in root.iterfind("./devices/disk"):
            target, source = disk.find("target"), disk.find("source")
            if target is not None and source is not None and source.get("file"):
                found[str(target.get("dev"))] = str(source.get("file"))
        return found

    def snapshot_names(self) -> list[str]:
        return sorted(str(s.getName()) for s in self.dom.listAllSnapshots(0))

    def remove(self) -> None:
        remove_domain(self.conn, self.name)


def remove_domain(conn: Any, name: str) -> None:
    """Destroy and undefine (its snapshot metadata too) and remove its files."""
    lv = harness._require_libvirt()
    with contextlib.suppress(Exception):
        dom = conn.lookupByName(name)
        with contextlib.suppress(Exception):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(Exception):
            dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    shutil.rmtree(harness.vm_root() / name, ignore_errors=True)


def remove_stale(conn: Any) -> list[str]:
    """What an interrupted run of this tier left: ``gbe2e-hv-*`` domains and directories."""
    names = {str(d.name()) for d in conn.listAllDomains(0) if str(d.name()).startswith(PREFIX)}
    names |= {p.name for p in harness.vm_root().glob(PREFIX + "*")}
    for name in sorted(names):
        remove_domain(conn, name)
    return sorted(names)


# --- the bus and the bridge -------------------------------------------------------------------


@dataclass
class Reply:
    data: dict[str, Any] | None
    error: BusError | None
    seconds: float

    @property
    def code(self) -> str | None:
        return None if self.error is None else self.error.code

    def ok(self, model: type[M]) -> M:
        assert self.error is None, f"expected a result, got {self.error!r}"
        return model.model_validate(self.data)


@dataclass
class HvStack:
    """A nats-server (the session's), the buckets, and serial-bridges started and stopped
    at will, discovering only the VMs the test :meth:`show`s them."""

    nats_url: str
    workdir: Path
    host: str = field(default_factory=lambda: "hv-host-" + secrets.token_hex(3))
    nc: Client | None = None
    bridge: ServiceHost | None = None
    events: list[SnapshotEvent] = field(default_factory=list)

    @property
    def xml_dir(self) -> Path:
        return self.workdir / "xml"

    async def open(self) -> None:
        self.xml_dir.mkdir(parents=True, exist_ok=True)
        self.nc = await nats.connect(self.nats_url, name="hv-tests")
        await provision(self.nc.jetstream(), 1)

        async def on_event(msg: Msg) -> None:
            self.events.append(SnapshotEvent.model_validate_json(msg.data))

        await self.nc.subscribe(f"{EVT_PREFIX}.{EVT_SNAPSHOT}.>", cb=on_event)

    async def close(self) -> None:
        await self.stop_bridge()
        if self.nc is not None:
            await self.nc.close()

    def settings(self, **overrides: Any) -> BridgeSettings:
        values: dict[str, Any] = dict(
            nats_url=self.nats_url,
            http_port=0,
            socket_pattern="",
            libvirt_xml_dirs=[str(self.xml_dir)],
            scan_interval=0.2,
            bridge_host=self.host,
            libvirt_uri=harness.URI,
            restore_check_interval=0.5,
            freeze_timeout=3.0,
            unmount_timeout=1.0,
            detach_timeout=10.0,
            shutdown_timeout=10.0,
        )
        values.update(overrides)
        return BridgeSettings(**values)

    async def start_bridge(self, **overrides: Any) -> SerialBridge:
        assert self.bridge is None, "a bridge is running"
        service = SerialBridge()
        self.bridge = ServiceHost(service, self.settings(**overrides), registry=CollectorRegistry())
        await self.bridge.start()
        return service

    async def stop_bridge(self) -> None:
        if self.bridge is not None:
            bridge, self.bridge = self.bridge, None
            await bridge.stop()

    @property
    def service(self) -> SerialBridge:
        assert self.bridge is not None
        service = self.bridge.service
        assert isinstance(service, SerialBridge)
        return service

    def show(self, vm: TinyVM) -> None:
        """Let the bridge discover ``vm`` (as if its XML were in libvirt's directories)."""
        (self.xml_dir / f"{vm.name}.xml").write_text(vm.discovery_xml())

    def hide(self, vm: TinyVM) -> None:
        (self.xml_dir / f"{vm.name}.xml").unlink(missing_ok=True)

    async def record(self, vm: str) -> VmRecord | None:
        assert self.nc is not None
        registry = Registry(await self.nc.jetstream().key_value(KV_VMS))
        return (await registry.get(vm))[0]

    async def wait_served(self, vm: TinyVM, timeout: float = 10.0) -> None:
        """Until the registry says the VM's host can snapshot it (the adapter subscribed
        before it said so)."""

        async def served() -> bool:
            rec = await self.record(vm.uuid)
            return rec is not None and rec.host_capabilities == CAPABILITIES

        await wait_until(served, timeout, f"the adapter to serve {vm.name}", 0.1)

    async def call(
        self,
        vm: str,
        op: str,
        body: BaseModel | dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
        subject: str | None = None,
    ) -> Reply:
        """A request to the host adapter; typed errors in :attr:`Reply.error` (transport
        errors, e.g. no responders, propagate)."""
        assert self.nc is not None
        if isinstance(body, BaseModel):
            data = body.model_dump_json(exclude_none=True).encode()
        else:
            data = json.dumps(body or {}).encode()
        started = time.monotonic()
        msg = await self.nc.request(
            subject or hv_subject(vm, op), data, timeout=timeout, headers=headers
        )
        seconds = time.monotonic() - started
        error = BusError.from_reply(msg.headers, msg.data)
        return Reply(None if error else json.loads(msg.data), error, seconds)

    async def restore_record(self, vm: str, label: str) -> RestoreAttachment | None:
        assert self.nc is not None
        kv = await self.nc.jetstream().key_value(KV_RESTORES)
        try:
            entry = await kv.get(f"{vm}.{label}")
        except KeyNotFoundError:
            return None
        return RestoreAttachment.model_validate_json(entry.value) if entry.value else None

    async def snapshot_record(self, vm: str, name: str) -> SnapshotRecord | None:
        assert self.nc is not None
        kv = await self.nc.jetstream().key_value(KV_SNAPSHOTS)
        try:
            entry = await kv.get(f"{vm}.{name}")
        except KeyNotFoundError:
            return None
        return SnapshotRecord.model_validate_json(entry.value) if entry.value else None

    def events_of(self, vm: str, action: str | None = None) -> list[SnapshotEvent]:
        return [e for e in self.events if e.vm == vm and (action is None or e.action == action)]
