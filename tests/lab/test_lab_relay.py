"""Relay semantics of the lab hypervisor, over real unix sockets and real ptys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from pathlib import Path

import pytest
import serial_asyncio

from guestbus.lab.hypervisor import LabHypervisor, LabMode, LabVM

MODES: list[LabMode] = ["pty", "socketpair"]
MiB = 1024 * 1024


async def connect(vm: LabVM) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(os.fspath(vm.socket_path))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def assert_silent(reader: asyncio.StreamReader, seconds: float = 0.2) -> None:
    """Nothing arrives on ``reader`` within ``seconds``."""
    with pytest.raises(TimeoutError):
        data = await asyncio.wait_for(reader.read(1), seconds)
        pytest.fail(f"unexpected data {data!r}")


def open_slave(vm: LabVM) -> int:
    """Open the pty slave exactly as an agent would open its serial device (non-blocking)."""
    assert vm.device_path is not None
    return os.open(vm.device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


async def fd_read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    """``os.read`` from a non-blocking fd until ``n`` bytes arrived."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if done.done():
            return
        try:
            chunk = os.read(fd, n - len(buf))
        except BlockingIOError:
            return
        except OSError as exc:
            done.set_exception(exc)
            return
        if not chunk:
            done.set_exception(EOFError(f"EOF after {len(buf)} of {n} bytes"))
            return
        buf.extend(chunk)
        if len(buf) >= n:
            done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
    return bytes(buf)


def pattern(n: int) -> bytes:
    """``n`` bytes where any reordering, loss or duplication is visible."""
    block = b"".join(i.to_bytes(4, "big") for i in range(n // 4 + 1))
    return block[:n]


@pytest.mark.parametrize("mode", MODES)
async def test_relay_both_ways(lab_dir: Path, mode: LabMode) -> None:
    async with LabHypervisor(lab_dir, mode=mode) as hv:
        vm = await hv.add_vm()
        assert vm.socket_path == lab_dir / f"{vm.uuid}.serial.1"
        assert vm.socket_path.is_socket()
        assert (vm.device_path is not None) == (mode == "pty")
        guest_r, guest_w = await vm.open_guest()
        host_r, host_w = await connect(vm)
        await asyncio.wait_for(vm.client_connected.wait(), 5)
        assert vm.stats.clients_served == 1

        host_w.write(b"hello guest\n")
        await host_w.drain()
        assert await asyncio.wait_for(guest_r.readexactly(12), 5) == b"hello guest\n"

        guest_w.write(b"hello host\n")
        await guest_w.drain()
        assert await asyncio.wait_for(host_r.readexactly(11), 5) == b"hello host\n"

        assert vm.stats.bytes_to_guest == 12
        assert vm.stats.bytes_to_host == 11
        assert vm.stats.dropped_guest_bytes == 0
        await close_writer(host_w)
        await asyncio.wait_for(vm.client_disconnected.wait(), 5)
        await close_writer(guest_w)


async def test_pty_slave_with_os_read_and_write(lab_dir: Path) -> None:
    async with LabHypervisor(lab_dir, mode="pty") as hv:
        vm = await hv.add_vm()
        fd = open_slave(vm)
        try:
            host_r, host_w = await connect(vm)
            await asyncio.wait_for(vm.client_connected.wait(), 5)
            host_w.write(b"ping\n")
            await host_w.drain()
            assert await fd_read_exactly(fd, 5) == b"ping\n"
            os.write(fd, b"pong\n")
            assert await asyncio.wait_for(host_r.readexactly(5), 5) == b"pong\n"
            await close_writer(host_w)
        finally:
            os.close(fd)


async def test_pty_is_raw_binary_passes_unmodified(lab_dir: Path) -> None:
    payload = bytes(range(256)) * 4 + b"\r\n\n\r\x1e\x03\x00\x04\x1a\x11\x13\x7f\xff\r"
    async with LabHypervisor(lab_dir, mode="pty") as hv:
        vm = await hv.add_vm()
        fd = open_slave(vm)
        try:
            iflag, oflag, _cflag, lflag, _ispeed, _ospeed, _cc = termios.tcgetattr(fd)
            assert lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN) == 0
            assert iflag & (termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON) == 0
            assert oflag & termios.OPOST == 0

            host_r, host_w = await connect(vm)
            await asyncio.wait_for(vm.client_connected.wait(), 5)
            host_w.write(payload)
            await host_w.drain()
            assert await fd_read_exactly(fd, len(payload)) == payload
            await assert_silent(host_r)  # no echo back to the host

            os.write(fd, payload)
            assert await asyncio.wait_for(host_r.readexactly(len(payload)), 5) == payload

            # and through the stream API (the slave is opened a second time)
            guest_r, guest_w = await vm.open_guest()
            guest_w.write(payload)
            await guest_w.drain()
            assert await asyncio.wait_for(host_r.readexactly(len(payload)), 5) == payload
            host_w.write(payload)
            await host_w.drain()
            assert await asyncio.wait_for(guest_r.readexactly(len(payload)), 5) == payload
            await close_writer(guest_w)
            await close_writer(host_w)
        finally:
            os.close(fd)


async def test_pyserial_asyncio_opens_the_device(lab_dir: Path) -> None:
    async with LabHypervisor(lab_dir, mode="pty") as hv:
        vm = await hv.add_vm()
        guest_r, guest_w = await serial_asyncio.open_serial_connection(
            url=vm.device_path, baudrate=115200
        )
        host_r, host_w = await connect(vm)
        await asyncio.wait_for(vm.client_connected.wait(), 5)
        host_w.write(b'\x1e{"m":1}\r\n\x00')
        await host_w.drain()
        assert await asyncio.wait_for(guest_r.readexactly(11), 5) == b'\x1e{"m":1}\r\n\x00'
        guest_w.write(b"\x03ok\r\n")
        assert await asyncio.wait_for(host_r.readexactly(5), 5) == b"\x03ok\r\n"
        guest_w.close()
        await close_writer(host_w)


@pytest.mark.parametrize("mode", MODES)
async def test_guest_output_without_client_is_dropped(lab_dir: Path, mode: LabMode) -> None:
    async with LabHypervisor(lab_dir, mode=mode) as hv:
        vm = await hv.add_vm()
        _guest_r, guest_w = await vm.open_guest()
        guest_w.write(b"nobody-hears-this")
        await guest_w.drain()
        await vm.wait_until(lambda v: v.stats.dropped_guest_bytes >= 17, timeout=5)
        assert vm.stats.dropped_guest_bytes == 17
        assert vm.stats.bytes_to_host == 0

        host_r, host_w = await connect(vm)
        await asyncio.wait_for(vm.client_connected.wait(), 5)
        guest_w.write(b"kept")
        await guest_w.drain()
        assert await asyncio.wait_for(host_r.readexactly(4), 5) == b"kept"
        await assert_silent(host_r)
        assert vm.stats.dropped_guest_bytes == 17
        await close_writer(host_w)
        await close_writer(guest_w)


@pytest.mark.parametrize("mode", MODES)
async def test_second_client_waits_until_first_disconnects(lab_dir: Path, mode: LabMode) -> None:
    async with LabHypervisor(lab_dir, mode=mode) as hv:
        vm = await hv.add_vm()
        guest_r, guest_w = await vm.open_guest()
        r1, w1 = await connect(vm)
        await asyncio.wait_for(vm.client_connected.wait(), 5)
        # The kernel completes the second connect (listen backlog) but the relay does not
        # accept it while the first client is served.
        r2, w2 = await connect(vm)
        w2.write(b"from-second")
        await w2.drain()

        guest_w.write(b"to-first")
        await guest_w.drain()
        assert await asyncio.wait_for(r1.readexactly(8), 5) == b"to-first"
        await assert_silent(r2)
        await assert_silent(guest_r)  # the waiting client's bytes do not reach the guest
        assert vm.stats.clients_served == 1

        await close_writer(w1)
        await vm.wait_until(lambda v: v.stats.clients_served == 2 and v.has_client, timeout=5)
        # Served now: what it wrote while waiting reaches the guest (as with QEMU) ...
        assert await asyncio.wait_for(guest_r.readexactly(11), 5) == b"from-second"
        # ... and it receives guest output.
        guest_w.write(b"to-second")
        await guest_w.drain()
        assert await asyncio.wait_for(r2.readexactly(9), 5) == b"to-second"
        assert vm.stats.dropped_guest_bytes == 0
        await close_writer(w2)
        await close_writer(guest_w)


async def test_client_disconnect_mid_stream_then_reconnect(lab_dir: Path) -> None:
    async with LabHypervisor(lab_dir, mode="socketpair") as hv:
        vm = await hv.add_vm()
        guest_r, guest_w = await vm.open_guest()
        for round_ in range(3):
            host_r, host_w = await connect(vm)
            await asyncio.wait_for(vm.client_connected.wait(), 5)
            msg = f"round {round_}".encode()
            host_w.write(msg)
            await host_w.drain()
            assert await asyncio.wait_for(guest_r.readexactly(len(msg)), 5) == msg
            guest_w.write(msg)
            await guest_w.drain()
            assert await asyncio.wait_for(host_r.readexactly(len(msg)), 5) == msg
            host_w.transport.abort()  # reset, not a clean close
            await asyncio.wait_for(vm.client_disconnected.wait(), 5)
        assert vm.stats.clients_served == 3
        await close_writer(guest_w)


async def test_backpressure_host_to_guest_pty(lab_dir: Path) -> None:
    data = pattern(MiB)
    async with LabHypervisor(lab_dir, mode="pty") as hv:
        vm = await hv.add_vm()
        _host_r, host_w = await connect(vm)
        await asyncio.wait_for(vm.client_connected.wait(), 5)
        host_w.write(data)
        writer_done = asyncio.ensure_future(host_w.drain())

        # Nobody reads the guest device: the pty fills up, then the relay buffer, then the relay
        # stops reading the client socket and the host writer stalls.
        await vm.wait_until(lambda v: v.buffered_to_guest >= v.buffer_limit, timeout=5)
        stalled_at = vm.stats.bytes_to_guest
        await asyncio.sleep(0.3)
        assert not writer_done.done()
        assert vm.stats.bytes_to_guest == stalled_at < len(data)
        assert vm.buffered_to_guest <= vm.buffer_limit
        assert vm.stats.bytes_from_host <= stalled_at + vm.buffer_limit

        guest_r, guest_w = await vm.open_guest()
        received = await asyncio.wait_for(guest_r.readexactly(len(data)), 15)
        assert received == data
        await asyncio.wait_for(writer_done, 5)
        assert vm.stats.peak_buffered_to_guest <= vm.buffer_limit
        assert vm.stats.bytes_to_guest == len(data)
        await close_writer(host_w)
        await close_writer(guest_w)


@pytest.mark.parametrize("mode", MODES)
async def test_backpressure_guest_to_host(lab_dir: Path, mode: LabMode) -> None:
    data = pattern(MiB)
    async with LabHypervisor(lab_dir, mode=mode, buffer_limit=16 * 1024) as hv:
        vm = await hv.add_vm()
        host_r, host_w = await connect(vm)
        await asyncio.wait_for(vm.client_connected.wait(), 5)
        _guest_r, guest_w = await vm.open_guest()
        guest_w.write(data)
        guest_done = asyncio.ensure_future(guest_w.drain())

        # The host client does not read: the relay fills its bounded buffer, stops reading the
        # guest side, and the guest writer stalls instead of data being dropped.
        await vm.wait_until(lambda v: v.buffered_to_host >= v.buffer_limit, timeout=5)
        await asyncio.sleep(0.2)
        assert not guest_done.done()
        assert vm.buffered_to_host <= vm.buffer_limit

        received = await asyncio.wait_for(host_r.readexactly(len(data)), 15)
        assert received == data
        await asyncio.wait_for(guest_done, 5)
        assert vm.stats.peak_buffered_to_host <= vm.buffer_limit
        assert vm.stats.dropped_guest_bytes == 0
        await close_writer(host_w)
        await close_writer(guest_w)
