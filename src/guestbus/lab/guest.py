"""The guest side of a lab VM's serial port: a pty pair or a socketpair.

* :class:`PtyGuestPort` — the relay owns the pty master; ``device_path`` is the slave
  (``/dev/pts/N``), set to raw mode, which an agent opens as its serial device (pyserial /
  pyserial-asyncio work on it). The lab keeps one slave fd open for the life of the port, as
  the UART exists whether or not the guest has opened it: host bytes queue in the tty (and
  then back up) until someone reads, and the master never sees a hangup.
* :class:`SocketPairGuestPort` — for thousands of VMs, where ptys would run out: the relay owns
  one end of ``socket.socketpair()``, the lab keeps the other.

Both offer :meth:`GuestPort.open`, returning asyncio streams on the guest side, so tests and
in-process agents use one API. ``open()`` may be called again after the streams are closed
(like reopening ``/dev/ttyS1``); when the VM stops, open streams see EOF.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import socket
import termios
import tty
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "FdTransport",
    "GuestPort",
    "PtyExhaustedError",
    "PtyGuestPort",
    "SocketPairGuestPort",
    "open_tty_stream",
    "pty_usage",
]

_PTY_NR = Path("/proc/sys/kernel/pty/nr")
_PTY_MAX = Path("/proc/sys/kernel/pty/max")
STREAM_LIMIT = 64 * 1024


class PtyExhaustedError(OSError):
    """No pty could be allocated. Use ``mode='socketpair'`` or raise ``kernel.pty.max``."""


def pty_usage() -> tuple[int, int] | None:
    """``(allocated, max)`` ptys on this kernel, or None when /proc does not say."""
    try:
        return int(_PTY_NR.read_text()), int(_PTY_MAX.read_text())
    except (OSError, ValueError):
        return None


def _pty_exhausted(cause: OSError | None) -> PtyExhaustedError:
    usage = pty_usage()
    where = f"kernel.pty.nr={usage[0]}, kernel.pty.max={usage[1]}" if usage else "usage unknown"
    why = f": {cause.strerror or cause}" if cause is not None else ""
    return PtyExhaustedError(
        cause.errno if cause is not None else errno.ENOSPC,
        f"cannot allocate a pty ({where}){why}; use mode='socketpair' for many VMs, "
        "or raise the limit (sysctl kernel.pty.max, devpts max= mount option)",
    )


class GuestPort(abc.ABC):
    """One guest serial device. The relay reads and writes :attr:`relay_fd`."""

    mode: ClassVar[str]
    device_path: str | None = None

    @property
    @abc.abstractmethod
    def relay_fd(self) -> int:
        """The non-blocking fd the relay uses (pty master / relay end of the socketpair)."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    @abc.abstractmethod
    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the guest end as asyncio streams (what an agent reads and writes)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device; open guest streams see EOF."""


class PtyGuestPort(GuestPort):
    """A pty pair: master for the relay, raw-mode slave at :attr:`device_path` for the guest."""

    mode: ClassVar[str] = "pty"

    def __init__(self) -> None:
        usage = pty_usage()
        if usage is not None and usage[0] >= usage[1]:
            raise _pty_exhausted(None)
        try:
            master, slave = os.openpty()
        except OSError as exc:
            raise _pty_exhausted(exc) from exc
        try:
            # Raw: no echo, no line discipline, no signals (\x03), no CR/NL translation, 8 bit.
            # TCSANOW, never TCSAFLUSH: flushing would discard queued host bytes.
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            self.device_path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self._master = master
        self._slave = slave
        self._closed = False

    @property
    def relay_fd(self) -> int:
        return self._master

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._closed or self.device_path is None:
            raise ConnectionError("guest serial device is gone (VM stopped)")
        fd = os.open(self.device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            tty.setraw(fd, termios.TCSANOW)
        except BaseException:
            os.close(fd)
            raise
        return await open_tty_stream(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._master)  # openers of the slave now read EOF/EIO
        os.close(self._slave)


class SocketPairGuestPort(GuestPort):
    """A socketpair: one end for the relay, the other is the guest's device."""

    mode: ClassVar[str] = "socketpair"

    def __init__(self) -> None:
        relay, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        relay.setblocking(False)
        guest.setblocking(False)
        self._relay = relay
        self._guest = guest
        self._closed = False

    @property
    def relay_fd(self) -> int:
        return self._relay.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._closed:
            raise ConnectionError("guest serial device is gone (VM stopped)")
        sock = self._guest.dup()  # closing the streams leaves the device itself in place
        try:
            sock.setblocking(False)
            return await asyncio.open_unix_connection(sock=sock, limit=STREAM_LIMIT)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._relay.close()  # open guest streams read EOF
        self._guest.close()


class FdTransport(asyncio.Transport):
    """A read/write transport over one non-blocking fd (a tty), driven by add_reader/add_writer.

    asyncio's pipe transports need two fds per tty and uvloop's do not read ptys, so this small
    transport is used instead; it works on any event loop that implements add_reader. EOF and
    EIO (the tty hangup seen once the pty master is gone) are reported as EOF.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        protocol: asyncio.Protocol,
        *,
        read_size: int = STREAM_LIMIT,
    ) -> None:
        super().__init__({"fd": fd})
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._read_size = read_size
        self._buffer = bytearray()
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._protocol_paused = False
        self._reading = False
        self._writing = False
        self._paused = False
        self._closing = False
        self._closed = False
        os.set_blocking(fd, False)
        protocol.connection_made(self)
        self._update_reading()

    # --- reading --------------------------------------------------------------------------

    def _update_reading(self) -> None:
        want = not self._closing and not self._paused
        if want != self._reading:
            if want:
                self._loop.add_reader(self._fd, self._read_ready)
            else:
                self._loop.remove_reader(self._fd)
            self._reading = want

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(None if exc.errno == errno.EIO else exc)
            return
        if not data:
            self._force_close(None)
            return
        self._protocol.data_received(data)

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._update_reading()

    # --- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if self._closing:
            return
        if not data:
            return
        if not self._buffer:
            try:
                n = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._force_close(exc)
                return
            data = memoryview(data)[n:]
            if not data:
                return
            self._loop.add_writer(self._fd, self._write_ready)
            self._writing = True
        self._buffer += data
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        try:
            n = os.write(self._fd, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._buffer[:n]
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            self._writing = False
            if self._closing:
                self._force_close(None)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("a serial device has no half-close")

    # --- closing --------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close after the pending output is written."""
        if self._closing:
            return
        self._closing = True
        self._update_reading()
        if not self._buffer:
            self._force_close(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._buffer.clear()
        os.close(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


async def open_tty_stream(
    fd: int, *, limit: int = STREAM_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Wrap a tty fd (ownership is taken) in asyncio streams; ``writer.close()`` closes it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        transport = FdTransport(loop, fd, protocol)
    except BaseException:
        os.close(fd)
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
