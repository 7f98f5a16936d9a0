"""The lab hypervisor: QEMU-like serial sockets for many fake VMs in one process.

Each :class:`LabVM` has a unix socket server at ``socket_dir / pattern.format(uuid=...)`` (the
libvirt ``<serial type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/<uuid>.serial.1'/>``
layout by default) relayed to a guest-side serial device — a raw pty (``mode="pty"``) or a
socketpair (``mode="socketpair"``, for thousands of VMs). The relay has QEMU's semantics (see
:mod:`guestbus.lab.relay`): one client at a time, guest output dropped without a client,
bounded buffers and backpressure, a fresh socket inode on restart.

Extension point for agents: :attr:`LabHypervisor.on_vm_added` (and ``on_vm_restarted``,
``on_vm_removed``) are plain lists of callbacks ``(vm) -> None | Awaitable[None]``. A hook can
start an agent task on ``await vm.open_guest()`` or on ``vm.device_path``; after a restart the
old guest streams read EOF and ``on_vm_restarted`` runs with the VM's fresh device.

CLI: ``python -m guestbus.lab.hypervisor --dir DIR --vms N [--mode pty|socketpair]``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import inspect
import logging
import resource
import signal
import sys
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Literal, get_args

from guestbus.lab.guest import GuestPort, PtyExhaustedError, PtyGuestPort, SocketPairGuestPort
from guestbus.lab.relay import (
    DEFAULT_BUFFER_LIMIT,
    QEMU_LISTEN_BACKLOG,
    RelayStats,
    SerialRelay,
    bind_unix_listener,
)

__all__ = [
    "DEFAULT_PATTERN",
    "FDS_PER_VM",
    "LabHypervisor",
    "LabMode",
    "LabVM",
    "VMHook",
    "main",
    "raise_nofile_limit",
]

log = logging.getLogger(__name__)

LabMode = Literal["pty", "socketpair"]
DEFAULT_PATTERN = "{uuid}.serial.1"

FDS_PER_VM = 5
"""File descriptors one VM may use: listener + client + 2 guest-side (pty master/slave or the
two socketpair ends) + 1 guest stream opened in-process."""
_FD_RESERVE = 256

VMHook = Callable[["LabVM"], "Awaitable[None] | None"]
"""A hook: called with the VM; may return an awaitable, which is awaited."""

Predicate = Callable[["LabVM"], bool]


def raise_nofile_limit(needed: int | None = None) -> tuple[int, int]:
    """Raise the RLIMIT_NOFILE soft limit to the hard limit if ``needed`` (or anything, when
    None) exceeds it. Returns the resulting ``(soft, hard)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target and (needed is None or needed > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE soft limit to %d: %s", target, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


class LabVM:
    """One lab VM: its host-side serial socket, the relay, and the guest-side device.

    Guest side: ``device_path`` (pty mode, the raw slave ``/dev/pts/N`` an agent opens) or
    :meth:`open_guest` (both modes: asyncio streams on the guest end).
    State: ``stats`` (:class:`RelayStats`), ``client_connected`` / ``client_disconnected``
    (asyncio events mirroring whether a host client is being served), :meth:`wait_until`.
    """

    def __init__(
        self,
        uuid: str,
        socket_path: Path,
        mode: LabMode,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        backlog: int = QEMU_LISTEN_BACKLOG,
    ) -> None:
        self.uuid = uuid
        self.socket_path = socket_path
        self.mode: LabMode = mode
        self.buffer_limit = buffer_limit
        self.stats = RelayStats()
        self.generation = 0
        """Incremented by every restart; guest devices of older generations are gone."""
        self.client_connected = asyncio.Event()
        """Set while a host client is connected and being served."""
        self.client_disconnected = asyncio.Event()
        """Set while no host client is being served."""
        self.client_disconnected.set()
        self._backlog = backlog
        self._port: GuestPort | None = None
        self._relay: SerialRelay | None = None
        self._waiters: list[tuple[Predicate, asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LabVM({self.uuid!r}, {self.mode}, {state}, socket={str(self.socket_path)!r})"

    # --- state ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._relay is not None

    @property
    def device_path(self) -> str | None:
        """Pty mode: the guest's serial device (raw pty slave). None in socketpair mode or
        while the VM is stopped."""
        return self._port.device_path if self._port is not None else None

    @property
    def has_client(self) -> bool:
        return self._relay is not None and self._relay.has_client

    @property
    def buffered_to_guest(self) -> int:
        """Bytes held by the relay for the guest (never more than ``buffer_limit``)."""
        return self._relay.buffered_to_guest if self._relay is not None else 0

    @property
    def buffered_to_host(self) -> int:
        """Bytes held by the relay for the host client (never more than ``buffer_limit``)."""
        return self._relay.buffered_to_host if self._relay is not None else 0

    # --- guest side -----------------------------------------------------------------------

    async def open_guest(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the guest's serial device as asyncio streams (pty slave or socketpair end).

        Can be called again after the streams are closed. After a restart the streams of the
        previous generation read EOF; open again.
        """
        if self._port is None:
            raise ConnectionError(f"VM {self.uuid} is not running")
        return await self._port.open()

    async def wait_until(self, predicate: Predicate, timeout: float | None = None) -> None:
        """Wait until ``predicate(vm)`` holds. It is re-checked after every relay event, so
        e.g. ``vm.wait_until(lambda v: v.stats.dropped_guest_bytes >= 4)`` needs no polling.
        Raises TimeoutError after ``timeout`` seconds."""
        if predicate(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.remove(entry)

    def _notify(self) -> None:
        if not self._waiters:
            return
        for predicate, fut in list(self._waiters):
            if fut.done():
                continue
            try:
                if predicate(self):
                    fut.set_result(None)
            except Exception as exc:
                fut.set_exception(exc)

    def _on_client(self, connected: bool) -> None:
        if connected:
            self.client_disconnected.clear()
            self.client_connected.set()
        else:
            self.client_connected.clear()
            self.client_disconnected.set()

    # --- lifecycle (driven by LabHypervisor) ----------------------------------------------

    def _start(self) -> None:
        port: GuestPort = PtyGuestPort() if self.mode == "pty" else SocketPairGuestPort()
        try:
            listener = bind_unix_listener(self.socket_path, self._backlog)
            try:
                relay = SerialRelay(
                    listener,
                    self.socket_path,
                    port.relay_fd,
                    self.stats,
                    buffer_limit=self.buffer_limit,
                    on_client=self._on_client,
                    on_change=self._notify,
                )
            except BaseException:
                listener.close()
                self.socket_path.unlink(missing_ok=True)
                raise
        except BaseException:
            port.close()
            raise
        self._port = port
        self._relay = relay
        relay.start()
        self._notify()

    def _stop(self) -> None:
        relay, port = self._relay, self._port
        self._relay = None
        self._port = None
        if relay is not None:
            relay.close()  # unregisters the guest fd before the port closes it
        if port is not None:
            port.close()
        self._on_client(False)
        self._notify()


class LabHypervisor:
    """Many fake VMs with QEMU-like serial sockets in one process. Async context manager."""

    def __init__(
        self,
        socket_dir: Path,
        pattern: str = DEFAULT_PATTERN,
        mode: LabMode = "pty",
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        backlog: int = QEMU_LISTEN_BACKLOG,
    ) -> None:
        if mode not in get_args(LabMode):
            raise ValueError(f"mode must be one of {get_args(LabMode)}, not {mode!r}")
        if "{uuid}" not in pattern:
            raise ValueError(f"pattern {pattern!r} must contain '{{uuid}}'")
        if buffer_limit < 1:
            raise ValueError("buffer_limit must be at least 1 byte")
        self.socket_dir = Path(socket_dir)
        self.pattern = pattern
        self.mode: LabMode = mode
        self.buffer_limit = buffer_limit
        self.backlog = backlog
        self._vms: dict[str, LabVM] = {}
        self.vms: Mapping[str, LabVM] = MappingProxyType(self._vms)
        """Live VMs by uuid (read-only view)."""
        self.on_vm_added: list[VMHook] = []
        """Hooks run after a VM is live (socket listening, guest device ready)."""
        self.on_vm_restarted: list[VMHook] = []
        """Hooks run after a restarted VM is live again (with its new guest device)."""
        self.on_vm_removed: list[VMHook] = []
        """Hooks run after a VM was stopped and removed (also by :meth:`close`)."""
        self._closed = False

    async def __aenter__(self) -> LabHypervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def socket_path_for(self, uuid: str) -> Path:
        return self.socket_dir / self.pattern.format(uuid=uuid)

    async def add_vm(self, uuid: str | None = None) -> LabVM:
        """Create and start a VM (random uuid4 when None); run the ``on_vm_added`` hooks.

        Hook exceptions propagate to the caller; the VM stays registered."""
        if self._closed:
            raise RuntimeError("hypervisor is closed")
        vm_uuid = str(uuidlib.uuid4()) if uuid is None else uuid
        if not vm_uuid or "/" in vm_uuid or "\0" in vm_uuid:
            raise ValueError(f"invalid VM uuid {vm_uuid!r}")
        if vm_uuid in self._vms:
            raise ValueError(f"VM {vm_uuid} already exists")
        raise_nofile_limit((len(self._vms) + 1) * FDS_PER_VM + _FD_RESERVE)
        path = self.socket_path_for(vm_uuid)
        path.parent.mkdir(parents=True, exist_ok=True)
        vm = LabVM(vm_uuid, path, self.mode, buffer_limit=self.buffer_limit, backlog=self.backlog)
        self._start_vm(vm)
        self._vms[vm_uuid] = vm
        await _run_hooks(self.on_vm_added, vm)
        return vm

    async def remove_vm(self, uuid: str) -> None:
        """Stop a VM: client disconnected, socket file removed, guest device closed."""
        vm = self._get(uuid)
        async with vm._lock:
            vm._stop()
            self._vms.pop(uuid, None)
        await _run_hooks(self.on_vm_removed, vm)

    async def restart_vm(self, uuid: str, downtime: float = 0.2) -> LabVM:
        """Stop the VM (socket file disappears, client and guest device closed), wait
        ``downtime`` seconds, start it again: same socket path, new inode, fresh guest device
        (new pty / socketpair). Runs the ``on_vm_restarted`` hooks."""
        vm = self._get(uuid)
        async with vm._lock:
            vm._stop()
            await asyncio.sleep(downtime)
            if self._vms.get(uuid) is not vm:
                raise RuntimeError(f"VM {uuid} was removed during restart")
            self._start_vm(vm)
            vm.generation += 1
            vm.stats.restarts += 1
        await _run_hooks(self.on_vm_restarted, vm)
        return vm

    async def close(self) -> None:
        """Remove every VM. Idempotent."""
        self._closed = True
        for uuid in list(self._vms):
            if uuid in self._vms:
                await self.remove_vm(uuid)

    def _get(self, uuid: str) -> LabVM:
        try:
            return self._vms[uuid]
        except KeyError:
            raise KeyError(f"no VM {uuid}") from None

    def _start_vm(self, vm: LabVM) -> None:
        try:
            vm._start()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                raise OSError(
                    exc.errno,
                    f"out of file descriptors starting VM {vm.uuid} "
                    f"({len(self._vms)} VMs running, ~{FDS_PER_VM} fds each; "
                    f"RLIMIT_NOFILE soft={soft} hard={hard}): {exc.strerror}",
                ) from exc
            raise


async def _run_hooks(hooks: Sequence[VMHook], vm: LabVM) -> None:
    for hook in list(hooks):
        result = hook(vm)
        if inspect.isawaitable(result):
            await result


# --- CLI --------------------------------------------------------------------------------------


def _table(rows: Sequence[tuple[str, str, str]]) -> str:
    header = ("uuid", "socket", "device")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(3)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (header, *rows)
    ]
    return "\n".join(lines)


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LabHypervisor(
        args.dir, args.pattern, args.mode, buffer_limit=args.buffer_limit
    ) as hv:
        try:
            for _ in range(args.vms):
                await hv.add_vm()
        except (PtyExhaustedError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        rows = [
            (vm.uuid, str(vm.socket_path), vm.device_path or f"({vm.mode})")
            for vm in hv.vms.values()
        ]
        print(_table(rows))
        print(f"{len(rows)} VMs running ({args.mode} mode); press Ctrl-C to stop", flush=True)
        await stop.wait()
    print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guestbus.lab.hypervisor",
        description="Run lab VMs exposing QEMU-like serial unix sockets (no real guests).",
    )
    parser.add_argument("--dir", type=Path, required=True, help="socket directory")
    parser.add_argument("--vms", type=int, default=1, help="number of VMs (default 1)")
    parser.add_argument(
        "--mode",
        choices=get_args(LabMode),
        default="pty",
        help="guest side: pty (device path per VM) or socketpair (scales)",
    )
    parser.add_argument(
        "--pattern",
        default=DEFAULT_PATTERN,
        help=f"socket file name pattern (default {DEFAULT_PATTERN!r})",
    )
    parser.add_argument(
        "--buffer-limit",
        type=int,
        default=DEFAULT_BUFFER_LIMIT,
        help="relay buffer bound per direction, bytes",
    )
    args = parser.parse_args(argv)
    if args.vms < 0:
        parser.error("--vms must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
