"""The real hypervisor tier below the services: a Debian guest under libvirt/QEMU (TCG) with the
reference serial port, found by the serial-bridge's discovery from libvirt's own XML, bytes
through ttyS1 both ways, and the agent installed from its ISO at first boot."""

from __future__ import annotations

import os
import re
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from guestbus_serial_bridge import discovery

from . import guest_media
from . import libvirt_harness as harness
from .serial_peer import SerialPeer

pytestmark = pytest.mark.e2e


def read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    sock.settimeout(1.0)
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} on the serial socket; got {seen[-300:]!r}")
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            raise ConnectionError("QEMU closed the serial socket")
        seen += chunk
    return seen


@pytest.mark.timeout(600)
def test_boot_console_socket_and_discovery(
    libvirt_conn: Any, guest_image: harness.GuestImage
) -> None:
    """Boots to a login prompt; QEMU binds the reference socket; the serial-bridge's
    discovery finds it, with the VM's uuid and name, from libvirt's live XML alone."""
    spec = harness.GuestSpec(firstboot_wait=3)
    with harness.boot_guest(spec, conn=libvirt_conn, image=guest_image) as guest:
        path = guest.wait_for_serial_socket()
        assert path == f"/var/lib/libvirt/qemu/{guest.uuid}.serial.1"
        assert stat.S_ISSOCK(os.stat(path).st_mode)

        live = guest.live_xml_path.read_text()
        assert "<domstatus" in live and guest.uuid in live
        found = discovery.scan(None, [harness.LIVE_XML_DIR], harness.SERIAL_PORT)
        assert found[guest.uuid] == discovery.VmSocket(
            uuid=guest.uuid, path=path, name=guest.name, source="libvirt-xml"
        )
        # The persistent definition says the same (the live XML is the one that matters:
        # it exists exactly while QEMU runs).
        persistent = discovery.scan(None, ["/etc/libvirt/qemu"], harness.SERIAL_PORT)
        assert persistent[guest.uuid].path == path

        guest.wait_for_console(harness.LOGIN_PROMPT, timeout=300)
        booted = time.monotonic() - (guest.started_at or 0)
        assert guest.wait_for_firstboot(timeout=120) == "no-media"
        assert f"{guest.name} login:" in guest.console_text()  # systemd.hostname= took
        print(f"\nboot to login prompt: {booted:.1f}s")
    assert not guest.live_xml_path.exists()
    assert not Path(guest.serial_socket).exists()
    assert guest.uuid not in discovery.scan(None, [harness.LIVE_XML_DIR], harness.SERIAL_PORT)
    assert not guest.workdir.exists()


@pytest.mark.timeout(600)
def test_serial_port_carries_bytes_both_ways(
    libvirt_conn: Any, guest_image: harness.GuestImage, tmp_path: Path
) -> None:
    """A shell in the guest writes to /dev/ttyS1; the bytes arrive on the host socket; a
    line the host writes arrives in the guest, which echoes it back."""
    iso = guest_media.serial_probe_iso(tmp_path / "probe.iso")
    token = uuid.uuid4().hex
    with harness.boot_guest(iso=iso, conn=libvirt_conn, image=guest_image) as guest:
        with guest.open_serial() as sock:
            first = read_until(sock, guest_media.PROBE_HELLO.encode(), timeout=300)
            assert re.search(rb"GUEST-TO-HOST \d+\n", first + read_until(sock, b"\n", 30))
            sock.sendall(f"HOST-TO-GUEST {token}\n".encode())
            echo = read_until(
                sock, f"{guest_media.PROBE_ECHO} HOST-TO-GUEST {token}\n".encode(), 60
            )
            assert token.encode() in echo
        guest.wait_for_console(f"serial-probe: the host said: HOST-TO-GUEST {token}", 60)
        assert guest.wait_for_firstboot(timeout=60) == "installed"
        # Found by its label: udev's /dev/disk/by-label/GUESTBUS, or blkid when the firstboot
        # unit looked before udev had made the link (seen on a cold, busy run).
        assert re.search(
            r"found the GUESTBUS media: /dev/sr0 \(by (udev|blkid)", guest.console_text()
        )


@pytest.mark.timeout(1500)
def test_agent_installed_at_first_boot_says_hello_over_serial(
    libvirt_conn: Any, guest_image: harness.GuestImage, tmp_path: Path
) -> None:
    """A full guestbus ISO: the firstboot unit runs its install.sh with no manual step; the
    agent it starts says hello on ttyS1 and answers host commands through the socket."""
    spec = harness.GuestSpec()
    house = guest_media.wheelhouse()
    spec.iso = guest_media.agent_iso(
        tmp_path / "guestbus.iso", spec.uuid, name=spec.name, heartbeat_interval=5, house=house
    )
    with harness.boot_guest(spec, conn=libvirt_conn, image=guest_image) as guest:
        with guest.open_serial() as sock:
            peer = SerialPeer(sock, guest.uuid)
            result = guest.wait_for_firstboot(timeout=1200)
            installed_at = time.monotonic() - (guest.started_at or 0)
            assert result == "installed", guest.console_text()[-3000:]
            hello = peer.wait_for_hello(timeout=120)
            hello_at = time.monotonic() - (guest.started_at or 0)
            assert hello["vm"] == guest.uuid
            assert hello["agent_version"] == house.agent_version
            assert peer.call("ping")["pong"] is True
            info = peer.call("info")
            assert info["hostname"] == guest.name
            assert info["kernel"] == guest_image.manifest["kernel"]
            assert "Debian GNU/Linux 12" in info["os"]
            peer.wait_for_heartbeats(2, timeout=30)  # every 5 s, as the HelloAck said
        print(
            f"\ninstalled at {installed_at:.0f}s, hello at {hello_at:.0f}s after start; "
            f"agent {hello['agent_version']}, python {info.get('python')}"
        )
