"""Real libvirt/QEMU guests for the e2e tier: daemons, domains, consoles, teardown.

    with boot_guest(iso=path_or_None) as guest:       # defined, started, torn down after
        guest.wait_for_console(r"login:", timeout=120)
        guest.serial_socket                            # the reference port 1, host side
        guest.live_xml_path                            # /run/libvirt/qemu/<name>.xml

    with defined_guest(GuestSpec(cdrom=path)) as guest:  # defined only: start it later
        ...                                            # (e.g. once its ISO is at `path`)
        guest.start()

A guest is the cached Debian image of ``e2e/guest-image`` (built on first use, a few
minutes), booted directly from its kernel and initrd (no boot loader) under TCG (domain type
``qemu``), its root file system a qcow2 overlay of the pristine ``base.raw``, with

- COM1 (``ttyS0``) the console: a pty (``virsh console`` works) logged to ``console.log``;
- COM2 (``ttyS1``) the **reference guestbus port**: a unix socket QEMU binds at
  ``/var/lib/libvirt/qemu/<uuid>.serial.1``, as ``guestbus vm serial-port-xml`` writes it;
- an IDE CD-ROM, with the given ISO or empty (media can be changed later);
- ACPI (PCI hot-plug of disks), a virtio RNG, no network, no USB.

Per-VM files live in ``$GUESTBUS_E2E_VM_DIR`` (default
``/var/lib/libvirt/images/guestbus-e2e``), which QEMU, running as ``libvirt-qemu``, can
reach (the image cache in root's home is not): the image is linked (or copied once) to
``<vm dir>/image-<hash>/`` next to the per-VM directories. Everything a guest made is
removed when its ``with`` block ends, errors included (``GUESTBUS_E2E_KEEP_CONSOLE=DIR``
keeps a copy of each console log in DIR); ``cleanup_stale()`` removes what an interrupted run
left (domains and directories named ``gbe2e-*``).

Needs root, libvirt's daemons and QEMU (``apt-get install libvirt-daemon-system
qemu-system-x86 qemu-utils``) and the binding (``pip install -e '.[e2e]'``); see e2e/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guestbus.libvirt_xml import serial_port_xml

try:
    import libvirt
except ImportError:  # the e2e extra is not installed: say so when a guest is asked for
    libvirt = None

REPO = Path(__file__).resolve().parents[2]
GUEST_IMAGE = REPO / "e2e" / "guest-image"
URI = "qemu:///system"
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
LIVE_XML_DIR = "/run/libvirt/qemu"
"""Where libvirt keeps the live XML of running domains (``<domstatus>``-wrapped)."""
SERIAL_SOCKET_DIR = "/var/lib/libvirt/qemu"
SERIAL_PORT = 1
NAME_PREFIX = "gbe2e-"
FIRSTBOOT_RESULT = re.compile(r"guestbus-firstboot: RESULT=(\S+)")
LOGIN_PROMPT = re.compile(r"login: ?$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class HarnessError(RuntimeError):
    """The environment cannot run guests, or a guest did not do what was waited for."""


def vm_root() -> Path:
    return Path(os.environ.get("GUESTBUS_E2E_VM_DIR", "/var/lib/libvirt/images/guestbus-e2e"))


def _require_libvirt() -> Any:
    if libvirt is None:
        raise HarnessError(
            "the libvirt binding is not installed: pip install -e '.[e2e]' "
            "(it builds against libvirt-dev: apt-get install libvirt-dev pkg-config)"
        )
    return libvirt


# --- the guest image ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestImage:
    """The cached image of ``e2e/guest-image`` (``directory``) and its manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def base(self) -> Path:
        return self.directory / "base.raw"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def guest_image() -> GuestImage:
    """Build the image if it is not cached (progress on stderr), and return it."""
    proc = subprocess.run(
        [str(GUEST_IMAGE)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise HarnessError(f"e2e/guest-image failed (exit {proc.returncode}); see its output")
    directory = Path(proc.stdout.strip().splitlines()[-1])
    return GuestImage(directory, json.loads((directory / "manifest.json").read_text()))


def staged_image(image: GuestImage) -> GuestImage:
    """The image where QEMU can read it: hard links (or a one-time sparse copy) under
    ``vm_root()/<image directory name>``; read-only, never written."""
    target = vm_root() / image.directory.name
    if (target / "manifest.json").is_file():
        return GuestImage(target, image.manifest)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("base.raw", "vmlinuz", "initrd.img", "manifest.json"):
        src, dst = image.directory / name, tmp / name
        try:
            os.link(src, dst)
        except OSError:
            subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    os.chmod(tmp, 0o755)
    try:
        tmp.rename(target)
    except OSError:  # another run staged it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    # Older recipes' images, unless a guest (whose overlay may sit on one) is still around.
    if not any(vm_root().glob(NAME_PREFIX + "*")):
        for other in vm_root().glob("image-*"):
            if other != target and ".tmp-" not in other.name:
                shutil.rmtree(other, ignore_errors=True)
    return GuestImage(target, image.manifest)


# --- the daemons and the connection ------------------------------------------------------------


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _wait_for(path: str, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(path):
        if time.monotonic() > deadline:
            raise HarnessError(f"{what} did not open {path} within {timeout:.0f}s")
        time.sleep(0.1)


def ensure_daemons(timeout: float = 30.0) -> None:
    """virtlogd and libvirtd, started (``-d``, daemonised) when not running.

    Under systemd they are socket-activated units: ``systemctl start libvirtd`` instead.
    """
    if _listening(LIBVIRT_SOCKET):
        return
    if os.geteuid() != 0:
        raise HarnessError("the e2e tier runs as root (libvirtd, QEMU's sockets)")
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "start", "virtlogd.socket", "libvirtd.service"], check=True)
        _wait_for(LIBVIRT_SOCKET, "libvirtd", timeout)
        return
    for daemon, sock in (("virtlogd", VIRTLOGD_SOCKET), ("libvirtd", LIBVIRT_SOCKET)):
        if _listening(sock):
            continue
        if shutil.which(daemon) is None:
            raise HarnessError(
                f"{daemon} is not installed: apt-get install libvirt-daemon-system qemu-system-x86"
            )
        subprocess.run([daemon, "-d"], check=True)
        _wait_for(sock, daemon, timeout)


def connect() -> Any:
    """A read-write connection to ``qemu:///system`` (daemons started if needed)."""
    lv = _require_libvirt()
    ensure_daemons()
    return lv.open(URI)


# --- the domain --------------------------------------------------------------------------------


@dataclass
class GuestSpec:
    """What differs between guests; the rest of the domain is fixed (see domain_xml)."""

    name: str = field(default_factory=lambda: NAME_PREFIX + uuidlib.uuid4().hex[:8])
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    memory_mib: int = 384
    tb_cache_mib: int = 128
    vcpus: int = 1
    iso: Path | None = None
    """An ISO copied into the guest's directory for its CD-ROM."""
    cdrom: Path | None = None
    """Or the CD-ROM's source as it is, not copied (e.g. where iso-builder writes the VM's
    ISO); it need not exist before the domain starts."""
    disk_from: Path | None = None
    """A qcow2 to copy as the root disk (a clone's), instead of a new overlay of the base."""
    firstboot_wait: int = 60
    quiet: bool = False
    extra_cmdline: str = ""


def serial_socket_path(vm_uuid: str, port: int = SERIAL_PORT) -> str:
    return f"{SERIAL_SOCKET_DIR}/{vm_uuid}.serial.{port}"


def kernel_cmdline(spec: GuestSpec) -> str:
    args = [
        "root=/dev/vda",
        "rw",
        "console=ttyS0,115200",
        f"systemd.hostname={spec.name}",
        f"guestbus.firstboot_wait={spec.firstboot_wait}",
        "systemd.show_status=1",
        "panic=-1",
    ]
    if spec.quiet:
        args.append("quiet")
    if spec.extra_cmdline:
        args.append(spec.extra_cmdline)
    return " ".join(args)


def domain_xml(
    spec: GuestSpec, image: GuestImage, disk: Path, iso: Path | None, console_log: Path
) -> str:
    """The domain: TCG, direct kernel boot, virtio root disk, console on COM1 (pty, logged),
    the reference guestbus serial port on COM2, an IDE CD-ROM, ACPI, no network."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(image.kernel)
    ET.SubElement(os_el, "initrd").text = str(image.initrd)
    ET.SubElement(os_el, "cmdline").text = kernel_cmdline(spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    # QEMU's TCG translation cache defaults to 1 GiB per guest (that much host RSS each).
    tcg = ET.SubElement(features, "tcg")
    ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(spec.tb_cache_mib)
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")

    root = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(root, "driver", name="qemu", type="qcow2")
    ET.SubElement(root, "source", file=str(disk))
    ET.SubElement(root, "target", dev="vda", bus="virtio")

    cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cdrom, "driver", name="qemu", type="raw")
    if iso is not None:
        ET.SubElement(cdrom, "source", file=str(iso))
    ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
    ET.SubElement(cdrom, "readonly")

    console = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(console, "log", file=str(console_log), append="off")
    ET.SubElement(console, "target", type="isa-serial", port="0")
    alias = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(alias, "target", type="serial", port="0")

    # The reference guestbus port: what `guestbus vm serial-port-xml <uuid> --index 1` prints.
    devices.append(ET.fromstring(serial_port_xml(serial_socket_path(spec.uuid), SERIAL_PORT)))

    ET.SubElement(devices, "controller", type="usb", model="none")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="virtio")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


class Guest:
    """One defined domain and its files; ``boot_guest()`` makes and removes them."""

    def __init__(self, conn: Any, spec: GuestSpec, image: GuestImage, workdir: Path) -> None:
        self.conn = conn
        self.spec = spec
        self.image = image
        self.workdir = workdir
        self.disk = workdir / "root.qcow2"
        self.console_log = workdir / "console.log"
        self.iso = workdir / "guestbus.iso" if spec.iso is not None else spec.cdrom
        self.dom: Any = None
        self.started_at: float | None = None
        self.started_wall: float | None = None
        """time.time() of the last start (to compare with bus events' timestamps)."""
        self._snapshots = 0

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uuid(self) -> str:
        return self.spec.uuid

    @property
    def serial_socket(self) -> str:
        return serial_socket_path(self.spec.uuid)

    @property
    def live_xml_path(self) -> Path:
        return Path(LIVE_XML_DIR) / f"{self.spec.name}.xml"

    def xml(self) -> str:
        return domain_xml(self.spec, self.image, self.disk, self.iso, self.console_log)

    def prepare(self) -> None:
        """The overlay on the pristine base (or a copy of ``disk_from``), and a private copy
        of the ISO."""
        self.workdir.mkdir(parents=True, exist_ok=False)
        os.chmod(self.workdir, 0o755)
        base, disk = str(self.image.base), str(self.disk)
        if self.spec.disk_from is not None:
            # A qcow2 overlay names its backing file (the staged base) by absolute path.
            subprocess.run(["cp", "--sparse=always", str(self.spec.disk_from), disk], check=True)
            os.chmod(disk, 0o644)
        else:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, disk],
                check=True,
            )
        if self.spec.iso is not None and self.iso is not None:
            shutil.copyfile(self.spec.iso, self.iso)
            os.chmod(self.iso, 0o644)

    def define(self) -> None:
        self.dom = self.conn.defineXML(self.xml())

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.dom.create()

    def freeze_disk(self) -> Path:
        """An external disk-only snapshot of the running guest's root disk: QEMU goes on
        writing to a new overlay, and the file it wrote until now is returned, consistent
        at the block level (like a power cut inside the guest: ext4's journal makes it
        whole at the next boot), for a clone to copy. The guest keeps running."""
        lv = _require_libvirt()
        self._snapshots += 1
        frozen = Path(self.dom_disk_source())
        top = self.workdir / f"root-snap{self._snapshots}.qcow2"
        snapshot = (
            f"<domainsnapshot><name>gbe2e-snap{self._snapshots}</name><disks>"
            f"<disk name='vda' snapshot='external'><source file='{top}'/></disk>"
            "<disk name='hdc' snapshot='no'/></disks></domainsnapshot>"
        )
        flags = (
            lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | lv.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        self.dom.snapshotCreateXML(snapshot, flags)
        if self.dom_disk_source() != str(top):
            raise HarnessError(f"{self.name}: the snapshot did not switch vda to {top}")
        return frozen

    def dom_disk_source(self) -> str:
        """The file the domain's root disk (vda) is on now (the live definition)."""
        root = ET.fromstring(self.dom.XMLDesc(0))
        for disk in root.iterfind("./devices/disk"):
            target, source = disk.find("target"), disk.find("source")
            if target is not None and target.get("dev") == "vda" and source is not None:
                return str(source.get("file"))
        raise HarnessError(f"{self.name} has no vda disk")

    def is_active(self) -> bool:
        return bool(self.dom is not None and self.dom.isActive())

    def destroy(self) -> None:
        if self.is_active():
            with contextlib.suppress(Exception):
                self.dom.destroy()

    def undefine(self) -> None:
        if self.dom is not None:
            with contextlib.suppress(Exception):
                _undefine(self.dom)
            self.dom = None

    def teardown(self) -> None:
        self.destroy()
        self.undefine()
        keep = os.environ.get("GUESTBUS_E2E_KEEP_CONSOLE")
        if keep and self.console_log.exists():
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.console_log, Path(keep) / f"{self.name}.console.log")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def live_xml(self) -> str:
        return str(self.dom.XMLDesc(0))

    # -- the console ----------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            raw = self.console_log.read_bytes()
        except FileNotFoundError:
            return ""
        return _ANSI.sub("", raw.decode("utf-8", errors="replace"))

    def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float = 180.0, start: int = 0
    ) -> re.Match[str]:
        """The first match of ``pattern`` in the console output (from offset ``start``),
        waiting for it; a guest that stops or a timeout raises with the console's end."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            found = regex.search(text, start)
            if found:
                return found
            if not self.is_active():
                raise HarnessError(
                    f"{self.name} stopped before the console showed {regex.pattern!r}:\n"
                    + _tail(text)
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name}: no {regex.pattern!r} on the console within {timeout:.0f}s:\n"
                    + _tail(text)
                )
            time.sleep(0.2)

    def wait_for_firstboot(self, timeout: float = 600.0) -> str:
        """The RESULT= of the guest's firstboot unit (installed, present, no-media, ...)."""
        return self.wait_for_console(FIRSTBOOT_RESULT, timeout).group(1)

    def console_tail(self, lines: int = 40) -> str:
        """The end of the console log, indented, for failure messages."""
        state = "running" if self.is_active() else "not running"
        return f"console of {self.name} ({state}), last {lines} lines:\n" + _tail(
            self.console_text(), lines
        )

    # -- the reference serial port, host side -------------------------------------------------

    def wait_for_serial_socket(self, timeout: float = 30.0) -> str:
        _wait_for(self.serial_socket, f"QEMU of {self.name}", timeout)
        return self.serial_socket

    def open_serial(self, timeout: float = 30.0) -> socket.socket:
        """A connection to COM2's socket, as the serial-bridge makes it (one client at a time:
        QEMU serves one)."""
        self.wait_for_serial_socket(timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.serial_socket)
        return sock


def _undefine(dom: Any) -> None:
    """Undefine, with its snapshots' metadata (libvirt refuses a plain undefine then)."""
    lv = _require_libvirt()
    dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join("    | " + line for line in text.splitlines()[-lines:])


@contextlib.contextmanager
def defined_guest(
    spec: GuestSpec, *, conn: Any = None, image: GuestImage | None = None
) -> Iterator[Guest]:
    """A guest defined (its persistent XML in /etc/libvirt/qemu) but not started; destroyed,
    undefined and its files removed afterwards, whatever happened in between."""
    image = image or staged_image(guest_image())
    own_conn = conn is None
    conn = conn or connect()
    guest = Guest(conn, spec, image, vm_root() / spec.name)
    try:
        guest.prepare()
        guest.define()
        yield guest
    finally:
        guest.teardown()
        if own_conn:
            with contextlib.suppress(Exception):
                conn.close()


@contextlib.contextmanager
def boot_guest(
    spec: GuestSpec | None = None,
    *,
    iso: Path | None = None,
    conn: Any = None,
    image: GuestImage | None = None,
) -> Iterator[Guest]:
    """A guest defined and started; destroyed, undefined and its files removed afterwards."""
    spec = spec or GuestSpec(iso=iso)
    if iso is not None:
        spec.iso = iso
    with defined_guest(spec, conn=conn, image=image) as guest:
        guest.start()
        yield guest


def cleanup_stale(conn: Any = None) -> list[str]:
    """Destroy and undefine every ``gbe2e-*`` domain and remove its files, and any other
    ``gbe2e-*`` directory in the VM directory (an interrupted run's leftovers, e.g. its ISO
    directory). Returns their names."""
    own_conn = conn is None
    conn = conn or connect()
    removed = []
    try:
        for dom in conn.listAllDomains(0):
            name = str(dom.name())
            if not name.startswith(NAME_PREFIX):
                continue
            with contextlib.suppress(Exception):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(Exception):
                _undefine(dom)
            shutil.rmtree(vm_root() / name, ignore_errors=True)
            removed.append(name)
        # Directories of a run without a domain (e.g. the tier's ISO directory).
        for leftover in vm_root().glob(NAME_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover.name)
    finally:
        if own_conn:
            conn.close()
    return removed
