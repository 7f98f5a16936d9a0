"""A QEMU-like serial relay: a unix socket server on the host side, a guest fd on the other.

This emulates what QEMU does for ``<serial type='unix'><source mode='bind' .../>``:

* **One client at a time.** While a client is connected the listening socket is *not watched*
  (its reader is removed from the event loop), exactly like QEMU, which drops the listener
  from its main loop until the connected client goes away. A second ``connect()`` therefore
  succeeds at the kernel level (it sits in the listen backlog, which is 1 like QEMU's; Linux
  queues backlog+1 unix connections, further connects block or fail with EAGAIN), it can even
  write into its socket buffer, but it receives no guest data and nothing it wrote reaches the
  guest. When the first client disconnects the relay accepts the next pending connection
  and serves it; whatever that client wrote while waiting is then delivered to the guest (as
  with QEMU: the bytes were sitting in the socket).
* **Guest output without a client is dropped** (and counted in ``dropped_guest_bytes``).
* **Backpressure.** Each direction has a bounded buffer (``buffer_limit`` bytes). When the
  guest side does not drain, the host→guest buffer fills up and the relay stops reading the
  client socket, so a blocking host writer stalls once the kernel socket buffers are full.
  Symmetrically a client that does not read stalls a guest writer. Reads never exceed the free
  space of the buffer, so a buffer never holds more than ``buffer_limit`` bytes.
* **Client disconnect** (EOF, reset, write error) closes the connection, drops pending
  guest→host bytes and goes back to accepting. Bytes already read from the client are still
  delivered to the guest.

Everything is driven by ``loop.add_reader``/``add_writer`` callbacks on raw non-blocking fds:
no task per VM or per byte, no polling. Interest is recomputed by :meth:`SerialRelay._sync`
after every event, so the registrations always match the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "QEMU_LISTEN_BACKLOG",
    "READ_CHUNK",
    "UNIX_PATH_MAX",
    "RelayStats",
    "SerialRelay",
    "bind_unix_listener",
]

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 108
"""``sizeof(sun_path)`` on Linux, including the terminating NUL."""

DEFAULT_BUFFER_LIMIT = 64 * 1024
"""Default bound of each direction's relay buffer, in bytes."""

READ_CHUNK = 64 * 1024
"""Largest single read from either side."""

QEMU_LISTEN_BACKLOG = 1
"""QEMU's char-socket server listens with a backlog of 1."""

_ACCEPT_BACKOFF = 0.5
"""Seconds to stop accepting after accept() failed with e.g. EMFILE (avoids a busy loop)."""


@dataclass
class RelayStats:
    """Per-VM counters. They survive VM restarts (the relay is recreated, the stats are not)."""

    bytes_to_guest: int = 0
    """Bytes written to the guest side (delivered into the guest's UART)."""
    bytes_to_host: int = 0
    """Bytes written to a connected host client."""
    bytes_from_host: int = 0
    """Bytes read from host clients (delivered, buffered or dropped)."""
    bytes_from_guest: int = 0
    """Bytes read from the guest side (delivered, buffered or dropped)."""
    dropped_guest_bytes: int = 0
    """Guest output discarded: written while no client was connected, or still buffered when the
    client went away or the VM stopped."""
    dropped_host_bytes: int = 0
    """Host bytes read from a client but discarded because the VM stopped or the guest side
    went away before they were delivered."""
    clients_served: int = 0
    """Client connections accepted (and served)."""
    restarts: int = 0
    """Completed VM restarts."""
    peak_buffered_to_guest: int = 0
    """High-water mark of the host→guest relay buffer."""
    peak_buffered_to_host: int = 0
    """High-water mark of the guest→host relay buffer."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def bind_unix_listener(path: Path, backlog: int = QEMU_LISTEN_BACKLOG) -> socket.socket:
    """Bind and listen on a unix stream socket at ``path`` (non-blocking).

    An existing *socket* file at ``path`` is replaced (a stale socket from a previous run, as
    QEMU does); any other existing file is refused.
    """
    raw = os.fsencode(path)
    if len(raw) >= UNIX_PATH_MAX:
        raise ValueError(
            f"unix socket path is {len(raw)} bytes, the kernel limit is {UNIX_PATH_MAX - 1}: "
            f"{path} (use a shorter socket directory)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "refusing to replace a non-socket file", str(path))
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(os.fspath(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class SerialRelay:
    """Relay bytes between the one connected client of ``listener`` and ``guest_fd``.

    The relay takes ownership of ``listener`` (closed, and its socket file unlinked, by
    :meth:`close`) but *not* of ``guest_fd``: the caller closes it, after :meth:`close`.

    ``on_client(connected)`` is called when a client is accepted / goes away; ``on_change()``
    after every event that changed counters or buffers (cheap hooks for waiters).
    """

    def __init__(
        self,
        listener: socket.socket,
        socket_path: Path,
        guest_fd: int,
        stats: RelayStats,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        on_client: Callable[[bool], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if buffer_limit < 1:
            raise ValueError("buffer_limit must be at least 1 byte")
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._listener_fd = listener.fileno()
        self._path = socket_path
        st = os.stat(socket_path)
        self._path_id = (st.st_dev, st.st_ino)
        self._guest_fd = guest_fd
        self.stats = stats
        self.buffer_limit = buffer_limit
        self._on_client = on_client or _noop_bool
        self._on_change = on_change or _noop
        self._client: socket.socket | None = None
        self._client_fd = -1
        self._to_guest = bytearray()
        self._to_host = bytearray()
        self._guest_alive = True
        self._closed = False
        self._started = False
        self._accept_backoff = False
        # What is currently registered with the loop.
        self._accepting = False
        self._reading_guest = False
        self._writing_guest = False
        self._reading_client = False
        self._writing_client = False

    # --- public state ---------------------------------------------------------------------

    @property
    def has_client(self) -> bool:
        return self._client is not None

    @property
    def buffered_to_guest(self) -> int:
        """Bytes read from the client, not yet written to the guest side."""
        return len(self._to_guest)

    @property
    def buffered_to_host(self) -> int:
        """Bytes read from the guest side, not yet written to the client."""
        return len(self._to_host)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def guest_alive(self) -> bool:
        return self._guest_alive

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting clients and reading the guest side."""
        if self._closed:
            raise RuntimeError("relay is closed")
        self._started = True
        self._sync()

    def close(self) -> None:
        """Disconnect the client, stop listening, unlink the socket file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sync()  # drops accept + guest registrations
        self._disconnect()
        if self._to_guest:
            self.stats.dropped_host_bytes += len(self._to_guest)
            self._to_guest.clear()
        self._listener.close()
        try:
            st = os.stat(self._path)
        except OSError:
            pass
        else:
            if (st.st_dev, st.st_ino) == self._path_id:  # never unlink a successor's socket
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)
        self._on_change()

    # --- interest management --------------------------------------------------------------

    def _sync(self) -> None:
        """Make the loop registrations match the state."""
        loop = self._loop
        live = self._started and not self._closed
        client = self._client

        want = live and client is None and not self._accept_backoff
        if want != self._accepting:
            if want:
                loop.add_reader(self._listener_fd, self._on_accept)
            else:
                loop.remove_reader(self._listener_fd)
            self._accepting = want

        guest = live and self._guest_alive
        want = guest and (client is None or len(self._to_host) < self.buffer_limit)
        if want != self._reading_guest:
            if want:
                loop.add_reader(self._guest_fd, self._on_guest_readable)
            else:
                loop.remove_reader(self._guest_fd)
            self._reading_guest = want

        # Writes are attempted eagerly; a non-empty buffer means the last write hit EAGAIN.
        want = guest and bool(self._to_guest)
        if want != self._writing_guest:
            if want:
                loop.add_writer(self._guest_fd, self._on_guest_writable)
            else:
                loop.remove_writer(self._guest_fd)
            self._writing_guest = want

        if client is None:
            return
        want = live and len(self._to_guest) < self.buffer_limit
        if want != self._reading_client:
            if want:
                loop.add_reader(self._client_fd, self._on_client_readable)
            else:
                loop.remove_reader(self._client_fd)
            self._reading_client = want
        want = live and bool(self._to_host)
        if want != self._writing_client:
            if want:
                loop.add_writer(self._client_fd, self._on_client_writable)
            else:
                loop.remove_writer(self._client_fd)
            self._writing_client = want

    # --- accept / disconnect --------------------------------------------------------------

    def _on_accept(self) -> None:
        if self._client is not None or self._closed:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning(
                "accept on %s failed (%s); retrying in %.1fs", self._path, exc, _ACCEPT_BACKOFF
            )
            self._accept_backoff = True
            self._sync()
            self._loop.call_later(_ACCEPT_BACKOFF, self._end_accept_backoff)
            return
        conn.setblocking(False)
        self._client = conn
        self._client_fd = conn.fileno()
        self.stats.clients_served += 1
        self._sync()
        self._on_client(True)
        self._on_change()

    def _end_accept_backoff(self) -> None:
        self._accept_backoff = False
        if not self._closed:
            self._sync()

    def _disconnect(self) -> None:
        client = self._client
        if client is None:
            return
        if self._reading_client:
            self._loop.remove_reader(self._client_fd)
            self._reading_client = False
        if self._writing_client:
            self._loop.remove_writer(self._client_fd)
            self._writing_client = False
        self._client = None
        self._client_fd = -1
        client.close()
        if self._to_host:
            self.stats.dropped_guest_bytes += len(self._to_host)
            self._to_host.clear()
        self._sync()
        self._on_client(False)
        self._on_change()

    def _guest_gone(self, exc: OSError | None) -> None:
        """The guest side reported EOF or an error: stop using it until the VM restarts."""
        log.debug("guest side of %s went away: %s", self._path, exc or "EOF")
        self._guest_alive = False
        if self._to_guest:
            self.stats.dropped_host_bytes += len(self._to_guest)
            self._to_guest.clear()
        self._sync()

    # --- host → guest ---------------------------------------------------------------------

    def _on_client_readable(self) -> None:
        client = self._client
        if client is None:
            return
        room = self.buffer_limit - len(self._to_guest)
        if room <= 0:
            self._sync()
            return
        try:
            data = client.recv(min(room, READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._disconnect()
            return
        if not data:
            self._disconnect()
            return
        self.stats.bytes_from_host += len(data)
        if self._guest_alive:
            self._to_guest += data
            if len(self._to_guest) > self.stats.peak_buffered_to_guest:
                self.stats.peak_buffered_to_guest = len(self._to_guest)
            self._flush_to_guest()
        else:
            self.stats.dropped_host_bytes += len(data)
        self._sync()
        self._on_change()

    def _flush_to_guest(self) -> None:
        if not self._to_guest or not self._guest_alive:
            return
        try:
            n = os.write(self._guest_fd, self._to_guest)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._guest_gone(exc)
            return
        del self._to_guest[:n]
        self.stats.bytes_to_guest += n

    def _on_guest_writable(self) -> None:
        self._flush_to_guest()
        self._sync()
        self._on_change()

    # --- guest → host ---------------------------------------------------------------------

    def _on_guest_readable(self) -> None:
        if self._client is None:
            want = READ_CHUNK
        else:
            want = min(READ_CHUNK, self.buffer_limit - len(self._to_host))
            if want <= 0:
                self._sync()
                return
        try:
            data = os.read(self._guest_fd, want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._guest_gone(exc)
            self._on_change()
            return
        if not data:
            self._guest_gone(None)
            self._on_change()
            return
        self.stats.bytes_from_guest += len(data)
        if self._client is None:
            self.stats.dropped_guest_bytes += len(data)
        else:
            self._to_host += data
            if len(self._to_host) > self.stats.peak_buffered_to_host:
                self.stats.peak_buffered_to_host = len(self._to_host)
            self._flush_to_host()
        self._sync()
        self._on_change()

    def _flush_to_host(self) -> None:
        client = self._client
        if client is None or not self._to_host:
            return
        try:
            n = client.send(self._to_host)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._disconnect()
            return
        del self._to_host[:n]
        self.stats.bytes_to_host += n

    def _on_client_writable(self) -> None:
        self._flush_to_host()
        self._sync()
        self._on_change()


def _noop() -> None:
    return None


def _noop_bool(_: bool) -> None:
    return None
