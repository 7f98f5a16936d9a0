"""Self-service file-level restore, guest side.

Root in the guest asks the running agent, over its local control socket, for the VM's
snapshots and to attach one; the agent forwards to the host (guest RPCs ``ssr_list``,
``ssr_attach``, ``ssr_detach``, ``ssr_attached``; rpc-router hands them to the VM's host
adapter), waits for the hot-plugged disk (found by its serial), and mounts it read-only at
``<restore_dir>/<label>`` (each partition at ``<label>/part<N>``). ``detach`` unmounts and asks
the host to detach; the host calls the agent's ``ssr_unmount`` before detaching by itself.

Control socket: ``/run/guestbus-agent.sock`` (mode 0600; the agent also checks that the peer
is root with SO_PEERCRED). One JSON line per request, one JSON line back:
``{"ok": true, "result": ...}`` or ``{"ok": false, "code": ..., "message": ...}``.

CPython 3.9+, standard library only.
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from guestbus.wire import errors
from guestbus.wire.aio import LinkClosed, RemoteError

from .quiesce import RESTORE_DIR, read_mountinfo

log = logging.getLogger("guestbus.agent.ssr")

CONTROL_SOCKET = "/run/guestbus-agent.sock"
DEVICE_WAIT = 60.0  # seconds to wait for the hot-plugged disk to appear
LIST_TIMEOUT = 15.0  # RPC timeouts: listing, and attaching/detaching (libvirt hot-plug)
CHANGE_TIMEOUT = 60.0
CLIENT_TIMEOUT = 3 * CHANGE_TIMEOUT + DEVICE_WAIT
REQUEST_LIMIT = 64 * 1024
VIRTIO_SERIAL_MAX = 20  # virtio-blk serials are cut at 20 bytes (VIRTIO_BLK_ID_BYTES)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PART_LINK = re.compile(r"-part[0-9]+$")
_DISK = re.compile(r"^[a-z][a-z0-9]{1,15}$")
"""A guest disk as libvirt names it (vda, sdb, …), as in the contract's ``DiskTarget``."""
_SERIAL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Never mounted: swap, volume-manager and encrypted members (their ids clash with the live
# disks' and activating them from a snapshot would confuse the running system).
NOT_MOUNTED = ("swap", "LVM2_member", "linux_raid_member", "crypto_LUKS", "zfs_member")

# Error codes of the control socket beyond the wire's (docs/snapshots-agent-notes.md).
BUSY = "busy"
MOUNT_FAILED = "mount_failed"
DEVICE_NOT_FOUND = "device_not_found"
NO_FILESYSTEM = "no_filesystem"

Rpc = Callable[[str, Dict[str, Any], float], Awaitable[Dict[str, Any]]]


class SsrError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise SsrError(errors.BAD_REQUEST, f"{what} must be 1-64 letters, digits, '_' or '-'")
    return value


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# --- finding the disk ----------------------------------------------------------------------


@dataclass
class DiskLocator:
    """Finds a hot-plugged disk by its serial, and its partitions (``/dev`` and ``/sys``)."""

    by_id_dir: str = "/dev/disk/by-id"
    sys_block_dir: str = "/sys/block"
    sys_class_block_dir: str = "/sys/class/block"
    dev_dir: str = "/dev"

    def find(self, serial: str) -> Optional[str]:
        """The device node of the disk whose serial is ``serial`` (or its first 20 bytes)."""
        wanted = {serial, serial[:VIRTIO_SERIAL_MAX]}
        try:
            names = sorted(os.listdir(self.by_id_dir))
        except OSError:
            names = []
        for name in names:
            if _PART_LINK.search(name):
                continue
            kind, _, rest = name.partition("-")
            match = (kind == "virtio" and rest in wanted) or (
                kind == "scsi" and any(rest.endswith(s) for s in wanted)
            )
            if match:
                return os.path.realpath(os.path.join(self.by_id_dir, name))
        try:
            disks = sorted(os.listdir(self.sys_block_dir))
        except OSError:
            disks = []
        for disk in disks:
            for file in ("serial", "device/serial"):
                with contextlib.suppress(OSError):
                    text = Path(self.sys_block_dir, disk, file).read_text(errors="replace")
                    if text.strip() in wanted:
                        return os.path.join(self.dev_dir, disk)
        return None

    def partitions(self, device: str) -> List[Tuple[int, str]]:
        """``(number, device node)`` of each partition of ``device``, by number."""
        disk = os.path.basename(device)
        base = Path(self.sys_class_block_dir, disk)
        found: List[Tuple[int, str]] = []
        try:
            children = sorted(os.listdir(str(base)))
        except OSError:
            return []
        for child in children:
            if not child.startswith(disk):
                continue
            try:
                number = int(Path(base, child, "partition").read_text().strip())
            except (OSError, ValueError):
                continue
            found.append((number, os.path.join(self.dev_dir, child)))
        return sorted(found)


def _run(argv: List[str], timeout: float = 60.0) -> Tuple[int, str]:
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return 127, f"{argv[0]} is not installed"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not finish within {timeout:g} s"
    return done.returncode, done.stdout.decode("utf-8", "replace").strip()


def fs_type(device: str) -> str:
    """The file system on ``device`` per blkid's low-level probe ("" when none)."""
    code, out = _run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
    return out.splitlines()[0].strip() if code == 0 and out else ""


def mount_options(fstype: str) -> List[str]:
    """Read-only, never replaying a journal (the disk is attached read-only: a replay would
    fail the mount); alternatives in order, for kernels that lack an option."""
    if fstype in ("ext3", "ext4"):
        return ["ro,noload"]
    if fstype == "xfs":
        return ["ro,norecovery,nouuid"]  # nouuid: the live disk has the same UUID
    if fstype == "btrfs":
        return ["ro,rescue=nologreplay", "ro,nologreplay", "ro"]
    return ["ro"]


def mount_ro(device: str, path: str, fstype: str) -> Tuple[int, str]:
    """Mount read-only with the first options the kernel takes; (exit code, output)."""
    code, out = 1, ""
    for options in mount_options(fstype):
        code, out = _run(["mount", "-t", fstype, "-o", options, device, path])
        if code == 0:
            break
    return code, out


# --- the agent's side ----------------------------------------------------------------------


class Restorer:
    """What the control socket and the host command ``ssr_unmount`` do."""

    def __init__(
        self,
        restore_dir: str = RESTORE_DIR,
        rpc: Optional[Rpc] = None,
        enabled: bool = True,
        locator: Optional[DiskLocator] = None,
        device_wait: float = DEVICE_WAIT,
        frozen_fn: Optional[Callable[[], bool]] = None,
    ) -> None:
        """``frozen_fn`` says whether the guest's file systems are frozen for a snapshot:
        nothing under the restore directory can be created or removed meanwhile."""
        self.restore_dir = restore_dir.rstrip("/") or "/"
        self.frozen_fn = frozen_fn or (lambda: False)
        self.rpc = rpc
        self.enabled = enabled
        self.locator = locator or DiskLocator()
        self.device_wait = device_wait
        self._lock: Optional[asyncio.Lock] = None

    def path_of(self, label: str) -> str:
        return os.path.join(self.restore_dir, _check_name(label, "a label"))

    # --- the control protocol --------------------------------------------------------------

    async def handle(self, request: Any) -> Dict[str, Any]:
        """One control request → its reply line (never raises)."""
        try:
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise SsrError(errors.BAD_REQUEST, "a request is a JSON object with an 'op'")
            if not self.enabled:
                raise SsrError(
                    errors.NOT_ALLOWED, "self-service restore is disabled on this VM (config 'ssr')"
                )
            op = request["op"]
            if op in ("attach", "detach") and self.frozen_fn():
                raise SsrError(
                    errors.FROZEN,
                    "the file systems are frozen for a snapshot right now: try again in a minute",
                )
            if op == "ls-snaps":
                result = await self.list_snapshots()
            elif op == "attach":
                result = await self.attach(request.get("snapshot"), request.get("disk"))
            elif op == "detach":
                result = await self.detach(request.get("label"), bool(request.get("force")))
            elif op == "ls-attached":
                result = await self.list_attached()
            else:
                raise SsrError(errors.UNKNOWN_METHOD, f"no operation {op!r}")
        except SsrError as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("control request failed")
            return {"ok": False, "code": errors.INTERNAL, "message": f"agent error: {exc!r}"}
        return {"ok": True, "result": result}

    async def _call(self, method: str, params: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        if self.rpc is None:
            raise SsrError(errors.NO_ACTIVE_LINK, "the agent has no link to the host")
        try:
            return await self.rpc(method, params, timeout)
        except RemoteError as exc:
            if exc.code == errors.NO_ACTIVE_LINK:
                raise SsrError(exc.code, exc.message) from None
            raise SsrError(exc.code, f"the host says: {exc.message}") from None
        except LinkClosed:
            raise SsrError(errors.LINK_LOST, "the link to the host dropped; try again") from None

    def _serialized(self) -> asyncio.Lock:
        if self._lock is None:  # made in the running loop (Python 3.9 binds locks to one)
            self._lock = asyncio.Lock()
        return self._lock

    async def list_snapshots(self) -> Dict[str, Any]:
        return await self._call("ssr_list", {}, LIST_TIMEOUT)

    async def list_attached(self) -> Dict[str, Any]:
        reply = await self._call("ssr_attached", {}, LIST_TIMEOUT)
        mounts = read_mountinfo()
        attachments: List[Dict[str, Any]] = []
        for att in reply.get("attachments") or []:
            entry = dict(att)
            label = att.get("label")
            points: List[str] = []
            if isinstance(label, str) and _NAME.match(label):
                base = self.path_of(label)
                points = [m.mount_point for m in mounts if _under(m.mount_point, base)]
            entry["mounted_at"] = points
            entry["path"] = self.path_of(label) if points else None
            attachments.append(entry)
        return {"attachments": attachments}

    async def attach(self, snapshot: Any, disk: Any = None) -> Dict[str, Any]:
        """Attach one disk of ``snapshot`` (its first, or the one that was guest disk
        ``disk``) and mount it under its label."""
        snapshot = _check_name(snapshot, "a snapshot name")
        params: Dict[str, Any] = {"snapshot": snapshot}
        if disk is not None:
            if not isinstance(disk, str) or not _DISK.match(disk):
                raise SsrError(
                    errors.BAD_REQUEST,
                    f"a disk is named like vdb or sdc (see ls-snaps), not {disk!r}",
                )
            params["disk"] = disk
        loop = asyncio.get_running_loop()
        async with self._serialized():
            att = await self._call("ssr_attach", params, CHANGE_TIMEOUT)
            label = att.get("label")
            serial = att.get("serial")
            if not isinstance(label, str) or not _NAME.match(label):
                raise SsrError(errors.INTERNAL, f"the host answered with a bad label {label!r}")
            try:
                if not isinstance(serial, str) or not _SERIAL.match(serial):
                    raise SsrError(
                        errors.INTERNAL, f"the host answered with a bad disk serial {serial!r}"
                    )
                device = await self._wait_device(serial)
                mounts, notes = await loop.run_in_executor(None, self._mount_all, label, device)
            except (SsrError, OSError) as exc:
                message = exc.message if isinstance(exc, SsrError) else str(exc)
                code = exc.code if isinstance(exc, SsrError) else MOUNT_FAILED
                undone = await self._undo(label, att)
                log.warning("restore of %s failed: %s; %s", snapshot, message, undone)
                raise SsrError(code, f"{message}; {undone}") from None
        log.info("restore disk %s (snapshot %s) mounted read-only", label, snapshot)
        return {**att, "path": self.path_of(label), "mounts": mounts, "notes": notes}

    async def _wait_device(self, serial: str) -> str:
        loop = asyncio.get_running_loop()
        end = time.monotonic() + self.device_wait
        while True:
            device = await loop.run_in_executor(None, self.locator.find, serial)
            if device is not None and os.path.exists(device):
                return device
            if time.monotonic() >= end:
                raise SsrError(
                    DEVICE_NOT_FOUND,
                    f"the disk with serial {serial} did not appear within {self.device_wait:g} s",
                )
            await asyncio.sleep(0.1)

    async def _undo(self, label: str, att: Dict[str, Any]) -> str:
        """A failed attach: unmount what was mounted and ask the host to detach again."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(SsrError, OSError):
            await loop.run_in_executor(None, self._unmount_label, label, True)
        try:
            await self._call("ssr_detach", {"label": label}, CHANGE_TIMEOUT)
        except SsrError as exc:
            return (
                f"detaching the disk again failed too ({exc.message}): the host detaches it at "
                f"{att.get('detach_at', 'its detach time')}, or run: guestbus-agent ssr detach "
                f"{label}"
            )
        return "the disk was detached again"

    def _mount_all(self, label: str, device: str) -> Tuple[List[Dict[str, Any]], List[str]]:
        base = self.path_of(label)
        already = [m for m in read_mountinfo() if _under(m.mount_point, base)]
        if already:  # attached and mounted before (the host answered for the same disk)
            return [
                {"device": m.source, "path": m.mount_point, "fstype": m.fstype} for m in already
            ], ["already mounted"]
        parts = self.locator.partitions(device)
        targets: List[Tuple[str, str, Optional[int]]] = (
            [(dev, os.path.join(base, f"part{n}"), n) for n, dev in parts]
            if parts
            else [(device, base, None)]
        )
        os.makedirs(self.restore_dir, mode=0o700, exist_ok=True)
        os.makedirs(base, mode=0o700, exist_ok=True)
        mounted: List[Dict[str, Any]] = []
        notes: List[str] = []
        for dev, path, number in targets:
            fstype = fs_type(dev)
            if not fstype:
                notes.append(f"{dev}: no file system found, not mounted")
                continue
            if fstype in NOT_MOUNTED:
                notes.append(f"{dev}: {fstype}, not mounted")
                continue
            os.makedirs(path, mode=0o700, exist_ok=True)
            code, out = mount_ro(dev, path, fstype)
            if code != 0:
                self._unmount_label(label, lazy=True)
                raise SsrError(MOUNT_FAILED, f"cannot mount {dev} ({fstype}) at {path}: {out}")
            mounted.append({"device": dev, "path": path, "fstype": fstype, "partition": number})
        if not mounted:
            self._unmount_label(label, lazy=True)
            raise SsrError(
                NO_FILESYSTEM,
                f"no file system to mount on {device}: " + ("; ".join(notes) or "empty disk"),
            )
        return mounted, notes

    async def detach(self, label: Any, force: bool = False) -> Dict[str, Any]:
        label = _check_name(label, "a label")
        loop = asyncio.get_running_loop()
        async with self._serialized():
            unmounted = await loop.run_in_executor(None, self._unmount_label, label, force)
            reply = await self._call("ssr_detach", {"label": label}, CHANGE_TIMEOUT)
        log.info("restore disk %s unmounted and detached", label)
        return {
            "label": label,
            "unmounted": unmounted,
            "path": self.path_of(label),
            "detached": bool(reply.get("detached", True)),
        }

    def _unmount_label(self, label: str, lazy: bool) -> List[str]:
        """Unmount everything at or under ``<restore_dir>/<label>`` (deepest first) and remove
        its directories. Busy without ``lazy``: SsrError(busy) and nothing more is done."""
        base = self.path_of(label)
        points = [m.mount_point for m in read_mountinfo() if _under(m.mount_point, base)]
        done: List[str] = []
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            code, out = _run(["umount", *(["-l"] if lazy else []), point])
            if code != 0:
                if "busy" in out:
                    raise SsrError(
                        BUSY,
                        f"{point} is busy: a process has files open or its working directory "
                        "there (fuser -vm shows which); close them, or detach --force to unmount "
                        "it lazily",
                    )
                raise SsrError(MOUNT_FAILED, f"cannot unmount {point}: {out}")
            done.append(point)
        if self.frozen_fn():
            return done  # removing the directories would wait for the thaw; left for later
        if os.path.isdir(base):
            for child in sorted(os.listdir(base)):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(base, child))
            with contextlib.suppress(OSError):
                os.rmdir(base)
        return done

    async def ssr_unmount(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Host command ``ssr_unmount`` {label}: lazily unmount it before the host detaches it.

        Idempotent: a label not mounted answers ``unmounted: false``.
        """
        try:
            label = _check_name(params.get("label"), "'label'")
            unmounted = await asyncio.get_running_loop().run_in_executor(
                None, self._unmount_label, label, True
            )
        except SsrError as exc:
            raise RemoteError(exc.code, exc.message) from None
        if unmounted:
            log.info("restore disk %s unmounted for the host (%s)", label, ", ".join(unmounted))
        return {
            "label": label,
            "unmounted": bool(unmounted),
            "path": self.path_of(label) if unmounted else None,
        }


# --- the control socket --------------------------------------------------------------------


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def refusal_for(uid: int) -> Optional[Dict[str, Any]]:
    """The reply for a peer that may not use the control socket (None: root may)."""
    if uid == 0:
        return None
    return {
        "ok": False,
        "code": errors.NOT_ALLOWED,
        "message": f"self-service restore is for root only (you are uid {uid})",
    }


class ControlServer:
    """The agent's local control socket (unix, mode 0600, root peers only)."""

    def __init__(self, restorer: Restorer, path: str = CONTROL_SOCKET) -> None:
        self.restorer = restorer
        self.path = path
        self.ready: Optional[asyncio.Event] = None

    async def serve(self) -> None:
        """Serve until cancelled; removes the socket file at the end."""
        self.ready = self.ready or asyncio.Event()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a previous run's
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
            server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=REQUEST_LIMIT
            )
            os.chmod(self.path, 0o600)
        except OSError as exc:
            log.error("cannot serve the control socket %s: %s", self.path, exc)
            return
        inode = os.stat(self.path).st_ino
        log.info("control socket %s ready (self-service restore)", self.path)
        self.ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Read the request even from a peer that is refused: closing on a client still
            # writing would show it a broken pipe instead of the reason.
            try:
                line = await asyncio.wait_for(reader.readline(), 30.0)
            except ValueError:  # longer than REQUEST_LIMIT
                line = b""
            reply = refusal_for(peer_uid(writer.get_extra_info("socket")))
            if reply is None:
                try:
                    request = json.loads(line.decode("utf-8"))
                except ValueError:
                    reply = {
                        "ok": False,
                        "code": errors.BAD_REQUEST,
                        "message": "send one JSON object on one line",
                    }
                else:
                    reply = await self.restorer.handle(request)
            writer.write(json.dumps(reply).encode("utf-8") + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# --- the CLI (``guestbus-agent ssr …``) ----------------------------------------------------


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def call(path: str, request: Dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> Dict[str, Any]:
    """Ask the running agent; its result, or ClientError (exit 2: cannot ask, 1: refused)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ClientError(
                f"the guestbus agent is not running (no control socket at {path})", 2
            ) from None
        except PermissionError:
            raise ClientError(f"permission denied on {path}: run as root", 2) from None
        with contextlib.suppress(BrokenPipeError):  # it may have answered (refused) already
            sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise ClientError(f"the agent did not answer within {timeout:g} s", 1) from None
    except OSError as exc:
        raise ClientError(f"talking to the agent at {path}: {exc.strerror or exc}", 2) from None
    finally:
        sock.close()
    try:
        reply = json.loads(data.decode("utf-8"))
    except ValueError:
        raise ClientError("the agent closed the connection without an answer", 1) from None
    if not isinstance(reply, dict):
        raise ClientError("the agent sent something that is not an answer", 1)
    if not reply.get("ok"):
        code = reply.get("code", "error")
        raise ClientError(f"{reply.get('message', 'refused')} [{code}]", 1)
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON"
    )
    common.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"the agent's control socket (default {CONTROL_SOCKET})",
    )
    p = argparse.ArgumentParser(
        prog="guestbus-agent ssr",
        description="Self-service restore (root only): list this VM's snapshots, attach one "
        "read-only to copy files back from it, detach it when done. The running agent does "
        "the work; restore disks are detached automatically after a while.",
        parents=[common],
    )
    p.set_defaults(json=False, socket=CONTROL_SOCKET)
    sub = p.add_subparsers(dest="op", metavar="COMMAND")
    sub.required = True
    sub.add_parser("ls-snaps", parents=[common], help="this VM's snapshots")
    attach = sub.add_parser(
        "attach",
        parents=[common],
        help="attach a snapshot read-only and mount it under the restore directory",
    )
    attach.add_argument("snapshot", help="the snapshot's name (see ls-snaps)")
    attach.add_argument(
        "--disk",
        metavar="DISK",
        help="which of its disks, by the name it had in this VM (e.g. vdb; see ls-snaps); "
        "default: the first",
    )
    detach = sub.add_parser("detach", parents=[common], help="unmount and detach a restore disk")
    detach.add_argument("label", help="the restore disk's label (see ls-attached)")
    detach.add_argument(
        "--force",
        action="store_true",
        help="unmount even if busy (lazily: processes keep what they have open)",
    )
    sub.add_parser("ls-attached", parents=[common], help="restore disks attached to this VM")
    return p


def _when(value: Any) -> str:
    if not isinstance(value, str):
        return "-"
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
    )


def render(op: str, result: Dict[str, Any]) -> str:
    if op == "ls-snaps":
        snaps = result.get("snapshots") or []
        if not snaps:
            return "no snapshots of this VM"
        return table(
            ["NAME", "CREATED", "CONSISTENCY", "DISKS", "NOTES"],
            [
                [
                    str(s.get("name", "?")),
                    _when(s.get("created_at")),
                    str(s.get("consistency", "?")),
                    ",".join(str(d.get("target", "?")) for d in s.get("disks") or []) or "-",
                    "; ".join(str(r) for r in s.get("reasons") or []),
                ]
                for s in snaps
            ],
        )
    if op == "ls-attached":
        atts = result.get("attachments") or []
        if not atts:
            return "no restore disks attached"
        return table(
            ["LABEL", "SNAPSHOT", "DISK", "MOUNTED AT", "DETACHED AT"],
            [
                [
                    str(a.get("label", "?")),
                    str(a.get("snapshot", "?")),
                    str(a.get("disk") or "-"),
                    ", ".join(a.get("mounted_at") or []) or "(not mounted)",
                    _when(a.get("detach_at")),
                ]
                for a in atts
            ],
        )
    if op == "attach":
        label = result.get("label", "?")
        disk = f" (its disk {result['disk']})" if result.get("disk") else ""
        lines = [
            f"snapshot {result.get('snapshot', '?')}{disk} attached read-only as {label}, "
            "mounted at:"
        ]
        lines += [f"  {m.get('path')}" for m in result.get("mounts") or []]
        lines += [f"note: {n}" for n in result.get("notes") or []]
        lines.append(
            f"it is detached automatically at {_when(result.get('detach_at'))}; when done: "
            f"guestbus-agent ssr detach {label}"
        )
        return "\n".join(lines)
    unmounted = result.get("unmounted") or []
    what = f"unmounted {', '.join(unmounted)}; " if unmounted else ""
    return f"{what}restore disk {result.get('label', '?')} detached"


def main(argv: Optional[List[str]] = None, euid: Optional[int] = None) -> int:
    """``guestbus-agent ssr …``: 0 done, 1 refused or failed, 2 could not ask."""
    args = build_parser().parse_args(argv)
    if (os.geteuid() if euid is None else euid) != 0:
        print(
            "guestbus-agent ssr: error: self-service restore is for root: run it with sudo",
            file=sys.stderr,
        )
        return 2
    request: Dict[str, Any] = {"op": args.op}
    if args.op == "attach":
        request["snapshot"] = args.snapshot
        if args.disk is not None:
            request["disk"] = args.disk
    elif args.op == "detach":
        request.update(label=args.label, force=args.force)
    try:
        result = call(args.socket, request)
    except ClientError as exc:
        print(f"guestbus-agent ssr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else render(args.op, result))
    return 0
