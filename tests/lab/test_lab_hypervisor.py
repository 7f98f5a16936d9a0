"""Lifecycle, scale and CLI of the lab hypervisor (real unix sockets, real ptys)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from guestbus.lab.hypervisor import LabHypervisor, LabMode, LabVM

MODES: list[LabMode] = ["pty", "socketpair"]


async def connect(vm: LabVM) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(os.fspath(vm.socket_path))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


def entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def check_cli_row(lab_dir: Path, uuid: str, sock: str, device: str, mode: str) -> None:
    assert Path(sock) == lab_dir / f"{uuid}.serial.1"
    assert Path(sock).is_socket()
    if mode == "pty":
        assert Path(device).is_char_device()


async def roundtrip(vm: LabVM, msg: bytes) -> None:
    """One message host → guest and its echo guest → host, on fresh streams."""
    host_r, host_w = await connect(vm)
    guest_r, guest_w = await vm.open_guest()
    try:
        host_w.write(msg)
        await host_w.drain()
        assert await asyncio.wait_for(guest_r.readexactly(len(msg)), 10) == msg
        guest_w.write(msg[::-1])
        await guest_w.drain()
        assert await asyncio.wait_for(host_r.readexactly(len(msg)), 10) == msg[::-1]
    finally:
        await close_writer(host_w)
        await close_writer(guest_w)


@pytest.mark.parametrize("mode", MODES)
async def test_restart_vm(lab_dir: Path, mode: LabMode) -> None:
    async with LabHypervisor(lab_dir, mode=mode) as hv:
        vm = await hv.add_vm()
        path = vm.socket_path
        host_r, host_w = await connect(vm)
        guest_r, guest_w = await vm.open_guest()
        await asyncio.wait_for(vm.client_connected.wait(), 5)

        restart = asyncio.ensure_future(hv.restart_vm(vm.uuid, downtime=0.4))
        # The connected client and the guest device both see the VM go away ...
        assert await asyncio.wait_for(host_r.read(), 5) == b""
        assert await asyncio.wait_for(guest_r.read(), 5) == b""
        # ... and the socket file is gone during the downtime.
        assert not path.exists()
        assert not vm.running
        with pytest.raises(OSError):
            await connect(vm)
        with pytest.raises(ConnectionError):
            await vm.open_guest()

        assert await asyncio.wait_for(restart, 5) is vm
        assert path.is_socket()
        assert vm.running and vm.generation == 1 and vm.stats.restarts == 1
        assert hv.vms[vm.uuid] is vm
        assert (vm.device_path is not None) == (mode == "pty")
        await close_writer(host_w)
        await close_writer(guest_w)

        await roundtrip(vm, b"after restart\r\n")
        assert vm.stats.clients_served == 2


async def test_remove_vm_removes_socket_and_closes_both_ends(lab_dir: Path) -> None:
    async with LabHypervisor(lab_dir, mode="pty") as hv:
        vm = await hv.add_vm("0b7a6f0e-4c55-4f6e-9d43-6d1b8a9f2c11")
        assert vm.uuid == "0b7a6f0e-4c55-4f6e-9d43-6d1b8a9f2c11"
        assert list(hv.vms) == [vm.uuid]
        host_r, host_w = await connect(vm)
        guest_r, guest_w = await vm.open_guest()
        await asyncio.wait_for(vm.client_connected.wait(), 5)

        await hv.remove_vm(vm.uuid)
        assert not vm.socket_path.exists()
        assert vm.uuid not in hv.vms
        assert not vm.running and vm.device_path is None
        assert await asyncio.wait_for(host_r.read(), 5) == b""
        assert await asyncio.wait_for(guest_r.read(), 5) == b""
        with pytest.raises(ConnectionError):
            await vm.open_guest()
        with pytest.raises(KeyError):
            await hv.remove_vm(vm.uuid)
        await close_writer(host_w)
        await close_writer(guest_w)


async def test_close_removes_every_socket(lab_dir: Path) -> None:
    hv = LabHypervisor(lab_dir, pattern="vm-{uuid}/serial.sock", mode="socketpair")
    vms = [await hv.add_vm() for _ in range(5)]
    assert all(vm.socket_path == lab_dir / f"vm-{vm.uuid}" / "serial.sock" for vm in vms)
    assert all(vm.socket_path.is_socket() for vm in vms)
    await hv.close()
    assert not any(vm.socket_path.exists() for vm in vms)
    assert not hv.vms
    with pytest.raises(RuntimeError):
        await hv.add_vm()


async def test_hooks_run_on_add_restart_remove(lab_dir: Path) -> None:
    events: list[tuple[str, str]] = []
    greeted: list[bytes] = []

    async def attach_fake_guest(vm: LabVM) -> None:
        # What an agent launcher would do: open the guest side when the VM appears.
        _reader, writer = await vm.open_guest()
        writer.write(b"boot\n")  # no client yet: dropped, like a real boot banner
        await writer.drain()
        greeted.append(vm.uuid.encode())
        writer.close()
        events.append(("added", vm.uuid))

    async with LabHypervisor(lab_dir, mode="socketpair") as hv:
        hv.on_vm_added.append(attach_fake_guest)
        hv.on_vm_restarted.append(lambda vm: events.append(("restarted", vm.uuid)))
        hv.on_vm_removed.append(lambda vm: events.append(("removed", vm.uuid)))
        a = await hv.add_vm("a")
        b = await hv.add_vm("b")
        await a.wait_until(lambda v: v.stats.dropped_guest_bytes == 5, timeout=5)
        await hv.restart_vm("a", downtime=0.01)
        await hv.remove_vm("b")
        assert greeted == [b"a", b"b"]
        assert b.socket_path.name == "b.serial.1"
    assert events == [
        ("added", "a"),
        ("added", "b"),
        ("restarted", "a"),
        ("removed", "b"),
        ("removed", "a"),
    ]


async def test_add_vm_validation(lab_dir: Path) -> None:
    async with LabHypervisor(lab_dir, mode="socketpair") as hv:
        await hv.add_vm("dup")
        with pytest.raises(ValueError, match="already exists"):
            await hv.add_vm("dup")
        with pytest.raises(ValueError, match="invalid"):
            await hv.add_vm("../escape")
        with pytest.raises(ValueError, match="kernel limit"):
            await hv.add_vm("x" * 120)
        (lab_dir / "plain.serial.1").write_text("not a socket")
        with pytest.raises(FileExistsError):
            await hv.add_vm("plain")
        # A stale socket file (e.g. from a crashed run) is replaced, as QEMU does.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(os.fspath(lab_dir / "stale.serial.1"))
        stale.close()
        vm = await hv.add_vm("stale")
        await roundtrip(vm, b"fresh")
        assert sorted(hv.vms) == ["dup", "stale"]
    with pytest.raises(ValueError):
        LabHypervisor(lab_dir, pattern="no-uuid-here")
    with pytest.raises(ValueError):
        LabHypervisor(lab_dir, mode="vfio")  # type: ignore[arg-type]


async def test_thousand_vms_socketpair(lab_dir: Path) -> None:
    n = 1000
    started = time.monotonic()
    async with LabHypervisor(lab_dir, mode="socketpair") as hv:
        vms = [await hv.add_vm() for _ in range(n)]
        assert len(hv.vms) == n
        assert len(entries(lab_dir)) == n

        async def one(vm: LabVM) -> None:
            msg = b"ping " + vm.uuid.encode() + b"\n"
            host_r, host_w = await connect(vm)
            guest_r, guest_w = await vm.open_guest()
            host_w.write(msg)
            await host_w.drain()
            assert await guest_r.readexactly(len(msg)) == msg
            reply = b"pong " + vm.uuid.encode() + b"\n"
            guest_w.write(reply)
            await guest_w.drain()
            assert await host_r.readexactly(len(reply)) == reply
            await close_writer(host_w)
            await close_writer(guest_w)

        await asyncio.wait_for(asyncio.gather(*(one(vm) for vm in vms)), 30)
        assert all(vm.stats.bytes_to_guest == vm.stats.bytes_to_host == 42 for vm in vms)
        assert all(vm.stats.clients_served == 1 for vm in vms)
    assert not entries(lab_dir)
    assert time.monotonic() - started < 15


async def _read_until(stream: asyncio.StreamReader, marker: bytes) -> str:
    out = bytearray()
    while marker not in out:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"process ended before {marker!r}: {out.decode()!r}")
        out += line
    return out.decode()


@pytest.mark.parametrize(("mode", "count"), [("socketpair", 3), ("pty", 2)])
async def test_cli_prints_table_and_exits_cleanly_on_ctrl_c(
    lab_dir: Path, mode: str, count: int
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "guestbus.lab.hypervisor",
        "--dir",
        os.fspath(lab_dir),
        "--vms",
        str(count),
        "--mode",
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out = await asyncio.wait_for(_read_until(proc.stdout, b"Ctrl-C"), 20)
        rows = [line.split() for line in out.splitlines() if re.match(r"[0-9a-f]{8}-", line)]
        assert len(rows) == count
        for uuid, sock, device in rows:
            check_cli_row(lab_dir, uuid, sock, device, mode)
        # the sockets are live
        _reader, writer = await asyncio.open_unix_connection(rows[0][1])
        await close_writer(writer)

        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(proc.wait(), 10)
        stderr = (await proc.stderr.read()).decode()
        assert rc == 0, stderr
        assert "Traceback" not in stderr
        assert not entries(lab_dir)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_tens_of_pty_vms(lab_dir: Path) -> None:
    async with LabHypervisor(lab_dir, mode="pty") as hv:
        vms = [await hv.add_vm() for _ in range(40)]
        devices = {vm.device_path for vm in vms}
        assert len(devices) == 40 and None not in devices
        await asyncio.wait_for(
            asyncio.gather(*(roundtrip(vm, vm.uuid.encode() + b"\r\n") for vm in vms)), 20
        )
        assert all(vm.stats.bytes_to_host == 38 for vm in vms)


def test_pty_relay_under_uvloop(lab_dir: Path) -> None:
    """Services may run on uvloop; the lab (relay and guest streams) must work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with LabHypervisor(lab_dir, mode="pty") as hv:
            vm = await hv.add_vm()
            await roundtrip(vm, bytes(range(256)))
            guest_r, guest_w = await vm.open_guest()
            await hv.restart_vm(vm.uuid, downtime=0.01)
            assert await asyncio.wait_for(guest_r.read(), 5) == b""
            guest_w.close()
            await roundtrip(vm, b"again\r\n")

    uvloop.run(scenario())
