"""Self-service restore in the guest: a real agent (Link over a socket pair to a host end that
answers like rpc-router + the host adapter would), its real control socket, the real CLI, and
restore disks that are real read-only loop devices standing in for the hot-plugged disk.

Only the host's answers are a double. Standard library + pytest only (also runs on 3.9).
"""

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from guestbus.wire.aio import Channel, RemoteError
from guestbus_agent.agent import Agent
from guestbus_agent.config import parse_config
from guestbus_agent.main import build_parser as agent_parser
from guestbus_agent.main import main as agent_main
from guestbus_agent.quiesce import FITHAW, Quiescer, read_mountinfo
from guestbus_agent.ssr import (
    CONTROL_SOCKET,
    ControlServer,
    DiskLocator,
    Restorer,
    call,
    refusal_for,
)

VM = "5b0c1e2a-1111-4222-8333-944455556666"
NOBODY = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "losetup", "blkid")),
    reason="needs root, mkfs.ext4, losetup and blkid (real loop devices)",
)


# --- finding the disk (no root needed) -----------------------------------------------------


def test_the_disk_is_found_by_serial_even_cut_at_20_bytes(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (tmp_path / "vdb").write_text("")
    (tmp_path / "sdc").write_text("")
    (tmp_path / "vdb1").write_text("")
    (by_id / "virtio-gbssr-a-long-snapsho-part1").symlink_to(tmp_path / "vdb1")
    (by_id / "virtio-gbssr-a-long-snapsho").symlink_to(tmp_path / "vdb")  # 20 of 21 bytes
    (by_id / "virtio-gbssr-db-part").symlink_to(tmp_path / "vdb1")
    (by_id / "scsi-0QEMU_QEMU_HARDDISK_gbssr-other").symlink_to(tmp_path / "sdc")
    loc = DiskLocator(by_id_dir=str(by_id), sys_block_dir=str(tmp_path / "none"))
    assert loc.find("gbssr-a-long-snapshot") == str(tmp_path / "vdb")
    assert loc.find("gbssr-other") == str(tmp_path / "sdc")
    assert loc.find("gbssr-db-part") == str(tmp_path / "vdb1")  # "-part" in a label is fine
    assert loc.find("gbssr-absent") is None


def test_without_udev_links_sysfs_serials_are_read(tmp_path: Path) -> None:
    sys_block = tmp_path / "sys" / "block"
    (sys_block / "vda").mkdir(parents=True)
    (sys_block / "vda" / "serial").write_text("root-disk\n")
    (sys_block / "vdc").mkdir()
    (sys_block / "vdc" / "serial").write_text("gbssr-snap1\n")
    (sys_block / "vdc" / "vdc1").mkdir()
    (sys_block / "vdc" / "vdc1" / "partition").write_text("1\n")
    (sys_block / "vdc" / "vdc2").mkdir()
    (sys_block / "vdc" / "vdc2" / "partition").write_text("2\n")
    (sys_block / "vdc" / "queue").mkdir()
    loc = DiskLocator(
        by_id_dir=str(tmp_path / "absent"),
        sys_block_dir=str(sys_block),
        sys_class_block_dir=str(sys_block),
        dev_dir="/dev",
    )
    assert loc.find("gbssr-snap1") == "/dev/vdc"
    assert loc.partitions("/dev/vdc") == [(1, "/dev/vdc1"), (2, "/dev/vdc2")]
    assert loc.partitions("/dev/vda") == []


# --- the host end --------------------------------------------------------------------------


def run(argv: List[str]) -> str:
    done = subprocess.run(argv, check=True, capture_output=True)
    return done.stdout.decode().strip()


def ext4_image(path: Path, files: Dict[str, str], size_mb: int = 16) -> Path:
    """An ext4 image holding ``files`` (mkfs.ext4 -d: nothing mounted to make it)."""
    src = path.with_suffix(".src")
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    with open(str(path), "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(path)])
    return path


def partitions_of(device: str) -> List[str]:
    name = os.path.basename(device)
    base = Path("/sys/class/block", name)
    return sorted("/dev/" + c for c in os.listdir(str(base)) if (base / c / "partition").exists())


def partitioned_image(path: Path) -> Path:
    """Two partitions, an ext4 file system in each."""
    with open(str(path), "wb") as f:
        f.truncate(48 * 1024 * 1024)
    run(["parted", "-s", str(path), "mklabel", "msdos", "mkpart", "primary", "1MiB", "24MiB"])
    run(["parted", "-s", str(path), "mkpart", "primary", "24MiB", "47MiB"])
    dev = run(["losetup", "-f", "--show", "-P", str(path)])
    try:
        if not partitions_of(dev):  # a kernel without msdos partition support: tell it
            run(["partx", "-a", dev])
        for n, part in enumerate(partitions_of(dev), 1):
            src = path.parent / f"part{n}.src"
            src.mkdir()
            (src / "which.txt").write_text(f"partition {n}\n")
            run(["mkfs.ext4", "-q", "-F", "-d", str(src), part])
    finally:
        run(["losetup", "-d", dev])
    return path


class Host:
    """Answers the agent like rpc-router (hello, heartbeat, report) and, for ssr_*, like the
    host adapter: an "attached" snapshot is its image as a read-only loop device whose udev
    link appears a moment later. A snapshot of several disks has an image per disk
    (``disks``); its first disk is ``images``' (labelled as the snapshot), another is
    labelled ``<snapshot>-<disk>``, as the adapter does."""

    def __init__(self, by_id: Path, images: Dict[str, Path]) -> None:
        self.by_id = by_id
        self.images = images
        self.disks: Dict[str, Dict[str, Path]] = {}  # snapshot -> its other disks' images
        self.of: Dict[str, Tuple[str, str]] = {}  # label -> (snapshot, disk)
        self.calls: List[Tuple[str, Dict[str, Any]]] = []
        self.hello_params: Dict[str, Any] = {}
        self.attached: Dict[str, str] = {}  # label -> loop device
        self.channel: Optional[Channel] = None

    async def hello(self, params: Dict[str, Any]) -> Dict[str, Any]:
        self.hello_params = params
        return {
            "vm": VM,
            "link": "serial",
            "host": "test",
            "protocol": 1,
            "identity_matches": True,
            "heartbeat_interval": 0.5,
            "server_time": "2026-01-01T00:00:00Z",
        }

    async def rpc(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        if method in ("heartbeat", "report"):
            return {}
        self.calls.append((method, params))
        if method == "ssr_list":
            return {
                "snapshots": [
                    {
                        "vm": VM,
                        "name": name,
                        "host": "hv1",
                        "created_at": "2026-03-01T10:00:00+00:00",
                        "quiesce_requested": True,
                        "consistency": "filesystem",
                        "reasons": ["no pre_freeze script"],
                        "disks": [
                            {"target": target, "file": f"/img/{name}.{target}", "overlay": "/o"}
                            for target in ["vda", *sorted(self.disks.get(name, {}))]
                        ],
                    }
                    for name in sorted(self.images)
                ]
            }
        if method == "ssr_attach":
            name = params["snapshot"]
            if name not in self.images:
                raise RemoteError("snapshot_not_found", f"no snapshot {name}")
            disk = params.get("disk")
            if disk in (None, "vda"):
                image, label = self.images[name], name
            elif disk in self.disks.get(name, {}):
                image, label = self.disks[name][disk], f"{name}-{disk}"
            else:
                raise RemoteError("bad_request", f"snapshot {name} has no disk {disk}")
            dev = run(["losetup", "-f", "--show", "-r", "-P", str(image)])
            if name.startswith("parts") and not partitions_of(dev):
                run(["partx", "-a", dev])
            self.attached[label] = dev
            self.of[label] = (name, disk or "vda")
            serial = "gbssr-" + label
            link = self.by_id / ("virtio-" + serial[:20])  # as a guest shows a virtio serial
            asyncio.get_running_loop().call_later(0.3, link.symlink_to, dev)  # udev, late
            return self.attachment(label, serial, name, disk or "vda")
        if method == "ssr_detach":
            label = params["label"]
            gone: Optional[str] = self.attached.pop(label) if label in self.attached else None
            for old in self.by_id.iterdir():
                if gone is not None and os.path.realpath(str(old)) == gone:
                    old.unlink()
            if gone is not None:
                run(["losetup", "-d", gone])
            return {"label": label, "detached": gone is not None}
        if method == "ssr_attached":
            return {
                "attachments": [
                    self.attachment(label, "gbssr-" + label, *self.of[label])
                    for label in sorted(self.attached)
                ]
            }
        raise RemoteError("unknown_method", method)

    @staticmethod
    def attachment(
        label: str, serial: str, snapshot: Optional[str] = None, disk: str = "vda"
    ) -> Dict[str, Any]:
        return {
            "vm": VM,
            "label": label,
            "snapshot": snapshot or label,
            "disk": disk,
            "host": "hv1",
            "target": "vdz",
            "serial": serial,
            "file": f"/var/lib/libvirt/images/{label}.qcow2",
            "attached_at": "2026-03-01T10:00:00+00:00",
            "detach_at": "2026-03-02T10:00:00+00:00",
            "requested_by": "guest",
        }

    def cleanup(self) -> None:
        for dev in self.attached.values():
            subprocess.run(["losetup", "-d", dev], check=False)


class Harness:
    def __init__(
        self, tmp: Path, sock: Path, ssr: bool = True, quiescer: Optional[Quiescer] = None
    ) -> None:
        self.tmp = tmp
        self.quiescer = quiescer
        self.sock = sock
        self.restore = tmp / "restore"
        by_id = tmp / "by-id"
        by_id.mkdir()
        self.host = Host(by_id, {})
        self.config = parse_config(
            {
                "vm_uuid": VM,
                "config_uuid": "cfg-1",
                "gateway_host": "127.0.0.1",
                "heartbeat_interval": 0.5,
                "request_timeout": 2,
                "ip_fallback": False,
                "state_dir": str(tmp / "state"),
                "restore_dir": str(self.restore),
                "ssr": ssr,
            }
        )
        self.locator = DiskLocator(by_id_dir=str(by_id), sys_block_dir=str(tmp / "no-sysfs"))
        self.agent: Optional[Agent] = None

    async def start(self) -> None:
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        self.host.channel = Channel(rb, wb, on_hello=self.host.hello, on_request=self.host.rpc)
        self._host_task = asyncio.ensure_future(self.host.channel.run())
        opened: List[int] = []

        async def opener() -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if opened:
                await asyncio.sleep(3600)
            opened.append(1)
            return ra, wa

        self.agent = Agent(
            self.config,
            opener,
            certificates=False,
            control_socket=str(self.sock),
            disk_locator=self.locator,
            quiescer=self.quiescer,
        )
        self._task = asyncio.ensure_future(self.agent.run())
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while self.agent.active_link() is None or not self.sock.exists():
            assert loop.time() < end, "agent link or control socket did not come up"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for task in (self._task, self._host_task):
            task.cancel()
        await asyncio.gather(self._task, self._host_task, return_exceptions=True)

    async def cli(self, *argv: str) -> Tuple[int, str, str]:
        """``guestbus-agent ssr …`` in a child process (as root), like an operator runs it."""
        code, out, err = await asyncio.get_running_loop().run_in_executor(
            None, fork_run, lambda: agent_main(["ssr", *argv, "--socket", str(self.sock)]), None
        )
        return code, out, err

    async def call(self, request: Dict[str, Any]) -> Dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(
            None, call, str(self.sock), request, 120.0
        )

    def mounted_under(self, label: str) -> List[Any]:
        base = str(self.restore / label)
        return [m for m in read_mountinfo() if m.mount_point.startswith(base)]

    def cleanup(self) -> None:
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(self.restore) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        self.host.cleanup()


def fork_run(fn: Callable[[], int], uid: Optional[int]) -> Tuple[int, str, str]:
    """Run ``fn`` in a forked child (as ``uid`` if given): its exit code, stdout, stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(out_r)
            os.close(err_r)
            sys.stdout = os.fdopen(out_w, "w")
            sys.stderr = os.fdopen(err_w, "w")
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            code = fn()
        except SystemExit as exc:  # argparse's --help and usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # report, never run pytest's code in the child
            with contextlib.suppress(Exception):
                sys.stderr.write(f"child raised {exc!r}\n")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as o, os.fdopen(err_r) as e:
        out, err = o.read(), e.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory others may traverse (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="gb-ssr-"))
    os.chmod(str(path), 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(str(path), ignore_errors=True)


@pytest.fixture
def harness(tmp_path: Path, sock_dir: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, sock_dir / "agent.sock")
    try:
        yield h
    finally:
        h.cleanup()


# --- attach, read, detach ------------------------------------------------------------------


@needs_root
def test_attach_mounts_read_only_and_detach_unmounts(harness: Harness, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    harness.host.images["plain-snapshot-1"] = ext4_image(
        images / "plain.img", {"hello.txt": "from the past\n"}
    )
    label = "plain-snapshot-1"
    path = harness.restore / label

    async def main() -> None:
        await harness.start()
        try:
            code, out, err = await harness.cli("attach", label)
            assert code == 0, err
            assert str(path) in out and f"guestbus-agent ssr detach {label}" in out
            assert (path / "hello.txt").read_text() == "from the past\n"
            with pytest.raises(OSError):
                (path / "new.txt").write_text("no")
            (mount,) = harness.mounted_under(label)
            assert mount.read_only and mount.source.startswith("/dev/loop")
            assert stat.S_IMODE(os.stat(str(harness.restore)).st_mode) == 0o700
            assert ("ssr_attach", {"snapshot": label}) in harness.host.calls

            code, out, _ = await harness.cli("ls-attached", "--json")
            (att,) = json.loads(out)["attachments"]
            assert code == 0 and att["label"] == label and att["mounted_at"] == [str(path)]
            code, out, _ = await harness.cli("ls-attached")
            assert "LABEL" in out and str(path) in out and "2026-03-02 10:00 UTC" in out

            # busy: a process works in it; refused without --force, lazily with it
            busy = await asyncio.create_subprocess_exec("sleep", "30", cwd=str(path))
            try:
                code, _, err = await harness.cli("detach", label)
                assert code == 1 and "busy" in err and str(path) in err
                assert harness.mounted_under(label)
                assert ("ssr_detach", {"label": label}) not in harness.host.calls
                code, out, err = await harness.cli("detach", label, "--force")
                assert code == 0, err
                assert f"restore disk {label} detached" in out
            finally:
                busy.kill()
                await busy.wait()
            assert harness.mounted_under(label) == [] and not path.exists()
            assert ("ssr_detach", {"label": label}) in harness.host.calls
            assert harness.host.attached == {}
        finally:
            await harness.stop()

    asyncio.run(main())


@needs_root
@pytest.mark.skipif(
    not (shutil.which("parted") and shutil.which("partx")), reason="needs parted, partx"
)
def test_each_partition_is_mounted_at_part_n(harness: Harness, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    harness.host.images["parts"] = partitioned_image(images / "parts.img")

    async def main() -> None:
        await harness.start()
        try:
            result = await harness.call({"op": "attach", "snapshot": "parts"})
            base = harness.restore / "parts"
            assert [m["path"] for m in result["mounts"]] == [
                str(base / "part1"),
                str(base / "part2"),
            ]
            assert result["path"] == str(base)
            assert (base / "part1" / "which.txt").read_text() == "partition 1\n"
            assert (base / "part2" / "which.txt").read_text() == "partition 2\n"
            assert all(m.read_only for m in harness.mounted_under("parts"))
            detached = await harness.call({"op": "detach", "label": "parts"})
            assert sorted(detached["unmounted"]) == [str(base / "part1"), str(base / "part2")]
            assert harness.mounted_under("parts") == [] and not base.exists()
        finally:
            await harness.stop()

    asyncio.run(main())


@needs_root
def test_each_disk_of_a_snapshot_is_attached_under_its_own_label(
    harness: Harness, tmp_path: Path
) -> None:
    """A VM with a data disk: its snapshot has two disks; ``--disk`` picks the second,
    which the host labels ``<snapshot>-<disk>``; both can be mounted at once."""
    images = tmp_path / "images"
    images.mkdir()
    harness.host.images["two"] = ext4_image(images / "boot.img", {"which.txt": "boot disk\n"})
    harness.host.disks["two"] = {
        "vdb": ext4_image(images / "data.img", {"which.txt": "data disk\n"})
    }
    boot, data = harness.restore / "two", harness.restore / "two-vdb"

    async def main() -> None:
        await harness.start()
        try:
            code, out, _ = await harness.cli("ls-snaps")
            assert code == 0 and " vda,vdb " in out.splitlines()[1]
            code, out, err = await harness.cli("attach", "two", "--disk", "vdb")
            assert code == 0, err
            assert "(its disk vdb) attached read-only as two-vdb" in out and str(data) in out
            assert ("ssr_attach", {"snapshot": "two", "disk": "vdb"}) in harness.host.calls
            assert (data / "which.txt").read_text() == "data disk\n"
            code, _, err = await harness.cli("attach", "two")
            assert code == 0, err
            assert ("ssr_attach", {"snapshot": "two"}) in harness.host.calls
            assert (boot / "which.txt").read_text() == "boot disk\n"
            assert (data / "which.txt").read_text() == "data disk\n"  # still there
            code, out, _ = await harness.cli("ls-attached")
            rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
            assert rows["two"][1:3] == ["two", "vda"] and rows["two-vdb"][1:3] == ["two", "vdb"]

            # a bad disk name is refused here, before the host is asked
            calls = len(harness.host.calls)
            code, _, err = await harness.cli("attach", "two", "--disk", "../vdb")
            assert code == 1 and "a disk is named like vdb" in err
            assert len(harness.host.calls) == calls
            # one the snapshot does not have: the host says so
            code, _, err = await harness.cli("attach", "two", "--disk", "vdc")
            assert code == 1 and "has no disk vdc" in err

            for label in ("two-vdb", "two"):
                code, _, err = await harness.cli("detach", label)
                assert code == 0, err
            assert not boot.exists() and not data.exists() and harness.host.attached == {}
        finally:
            await harness.stop()

    asyncio.run(main())


@needs_root
def test_a_disk_that_cannot_be_mounted_is_detached_again(harness: Harness, tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    with open(str(blank), "wb") as f:
        f.truncate(8 * 1024 * 1024)
    harness.host.images["blank"] = blank

    async def main() -> None:
        await harness.start()
        try:
            code, _, err = await harness.cli("attach", "blank")
            assert code == 1
            assert "no file system" in err and "detached again" in err
            assert "Traceback" not in err
            assert ("ssr_detach", {"label": "blank"}) in harness.host.calls
            assert harness.host.attached == {}
            assert harness.mounted_under("blank") == []
            assert not (harness.restore / "blank").exists()
            # an unknown snapshot: the host's refusal, word for word
            code, _, err = await harness.cli("attach", "nope")
            assert code == 1 and "no snapshot nope" in err and "snapshot_not_found" in err
        finally:
            await harness.stop()

    asyncio.run(main())


@needs_root
def test_the_host_unmounts_before_detaching_idempotently(harness: Harness, tmp_path: Path) -> None:
    harness.host.images["s1"] = ext4_image(tmp_path / "s1.img", {"a": "1"})

    async def main() -> None:
        await harness.start()
        try:
            await harness.call({"op": "attach", "snapshot": "s1"})
            busy = await asyncio.create_subprocess_exec(
                "sleep", "30", cwd=str(harness.restore / "s1")
            )
            try:
                assert harness.host.channel is not None
                first = await harness.host.channel.request("ssr_unmount", {"label": "s1"}, 10)
                assert first == {
                    "label": "s1",
                    "unmounted": True,
                    "path": str(harness.restore / "s1"),
                }
                assert harness.mounted_under("s1") == []  # lazily, though busy
                again = await harness.host.channel.request("ssr_unmount", {"label": "s1"}, 10)
                assert again == {"label": "s1", "unmounted": False, "path": None}
                with pytest.raises(RemoteError) as err:
                    await harness.host.channel.request("ssr_unmount", {"label": "../x"}, 10)
                assert err.value.code == "bad_request"
            finally:
                busy.kill()
                await busy.wait()
        finally:
            await harness.stop()

    asyncio.run(main())


# --- the control socket and the CLI --------------------------------------------------------


@needs_root
def test_listing_snapshots_table_and_json(harness: Harness) -> None:
    harness.host.images = {"daily-1": Path("/none"), "daily-2": Path("/none")}

    async def main() -> None:
        await harness.start()
        try:
            assert "ssr" in harness.host.hello_params["capabilities"]
            assert "cmd:freeze" in harness.host.hello_params["capabilities"]
            assert stat.S_IMODE(os.stat(str(harness.sock)).st_mode) == 0o600
            code, out, _ = await harness.cli("ls-snaps")
            lines = out.splitlines()
            assert lines[0].split() == ["NAME", "CREATED", "CONSISTENCY", "DISKS", "NOTES"]
            assert code == 0 and lines[1].startswith("daily-1") and " vda " in lines[1]
            assert "2026-03-01 10:00 UTC" in lines[1]
            assert "filesystem" in lines[1] and "no pre_freeze script" in lines[1]
            code, out, _ = await harness.cli("ls-snaps", "--json")
            names = [s["name"] for s in json.loads(out)["snapshots"]]
            assert code == 0 and names == ["daily-1", "daily-2"]
            assert ("ssr_list", {}) in harness.host.calls
            # the protocol itself
            assert await raw(harness.sock, b"not json\n") == {
                "ok": False,
                "code": "bad_request",
                "message": "send one JSON object on one line",
            }
            reply = await raw(harness.sock, b'{"op": "format-disk"}\n')
            assert reply["ok"] is False and reply["code"] == "unknown_method"
            reply = await raw(harness.sock, b'{"op": "detach", "label": "../../etc"}\n')
            assert reply["ok"] is False and reply["code"] == "bad_request"
            reply = await raw(harness.sock, b'{"op": "ls-snaps"}\n')
            assert reply["ok"] is True and len(reply["result"]["snapshots"]) == 2
        finally:
            await harness.stop()
        assert not harness.sock.exists()  # removed when the agent stops

    asyncio.run(main())


async def raw(path: Path, line: bytes) -> Dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    await writer.drain()
    reply = await reader.readline()
    writer.close()
    result: Dict[str, Any] = json.loads(reply)
    return result


@needs_root
def test_ssr_disabled_refuses_and_is_not_advertised(tmp_path: Path, sock_dir: Path) -> None:
    h = Harness(tmp_path, sock_dir / "agent.sock", ssr=False)

    async def main() -> None:
        await h.start()
        try:
            assert "ssr" not in h.host.hello_params["capabilities"]
            code, _, err = await h.cli("ls-snaps")
            assert code == 1 and "disabled" in err and "not_allowed" in err
            assert h.host.calls == []
        finally:
            await h.stop()

    asyncio.run(main())


def client_as(uid: int, path: str) -> Callable[[], int]:
    def connect() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(path)
        except PermissionError:
            print("EACCES")
            return 0
        s.sendall(b'{"op": "ls-snaps"}\n')
        print(s.makefile().readline().strip())
        return 0

    return connect


@needs_root
def test_only_root_may_use_the_control_socket(sock_dir: Path) -> None:
    calls: List[str] = []

    async def rpc(method: str, params: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        calls.append(method)
        return {"snapshots": []}

    path = sock_dir / "agent.sock"
    server = ControlServer(Restorer(str(sock_dir / "restore"), rpc), str(path))

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        loop = asyncio.get_running_loop()
        try:
            for _ in range(500):
                if path.exists():
                    break
                await asyncio.sleep(0.01)
            # mode 0600: another user cannot even connect
            code, out, _ = await loop.run_in_executor(
                None, fork_run, client_as(NOBODY, str(path)), NOBODY
            )
            assert code == 0 and out.strip() == "EACCES"
            # even if the file mode let them, the agent checks the peer's uid (SO_PEERCRED)
            os.chmod(str(path), 0o666)
            code, out, err = await loop.run_in_executor(
                None, fork_run, client_as(NOBODY, str(path)), NOBODY
            )
            assert code == 0 and out, err
            reply = json.loads(out)
            assert reply["ok"] is False and reply["code"] == "not_allowed"
            assert "root only" in reply["message"] and str(NOBODY) in reply["message"]
            assert calls == []
            # root is served
            code, out, err = await loop.run_in_executor(
                None, fork_run, client_as(0, str(path)), None
            )
            assert code == 0 and out, err
            assert json.loads(out) == {"ok": True, "result": {"snapshots": []}}
            assert calls == ["ssr_list"]
            # the CLI refuses a non-root user before it connects, with exit code 2
            code, out, err = await loop.run_in_executor(
                None,
                fork_run,
                lambda: agent_main(["ssr", "ls-snaps", "--socket", str(path)]),
                NOBODY,
            )
            assert code == 2 and "for root" in err and "Traceback" not in err
            assert calls == ["ssr_list"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_peer_check_refuses_non_root() -> None:
    assert refusal_for(0) is None
    refused = refusal_for(1000)
    assert refused is not None and refused["code"] == "not_allowed"


def test_no_agent_running_is_said_plainly(tmp_path: Path) -> None:
    code, out, err = fork_run(
        lambda: agent_main(["ssr", "ls-attached", "--socket", str(tmp_path / "none.sock")]),
        None,
    )
    if os.geteuid() == 0:
        assert code == 2 and "agent is not running" in err and "none.sock" in err
    else:
        assert code == 2 and "for root" in err
    assert "Traceback" not in err and out == ""


def test_help_mentions_self_service_restore() -> None:
    text = agent_parser().format_help()
    assert "guestbus-agent ssr" in text and "--control-socket" in text
    assert CONTROL_SOCKET in text
    code, out, _ = fork_run(lambda: agent_main(["ssr", "--help"]), None)
    assert code == 0
    for op in ("ls-snaps", "attach", "detach", "ls-attached", "--json", "--socket"):
        assert op in out


@needs_root
def test_the_host_freezes_and_thaws_through_the_agent(tmp_path: Path, sock_dir: Path) -> None:
    """freeze / freeze_status / thaw over the agent's link, with a real frozen file system;
    restore operations wait while frozen, and an agent that stops thaws."""
    image = tmp_path / "fs.img"
    with open(str(image), "wb") as f:
        f.truncate(16 * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", str(image)])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", "-o", "loop", str(image), str(mnt)])
    only_mine = lambda: [m for m in read_mountinfo() if m.mount_point == str(mnt)]  # noqa: E731
    q = Quiescer(
        mounts_fn=only_mine,
        pre_freeze=str(tmp_path / "none"),
        post_thaw=str(tmp_path / "none"),
        restore_dir=str(tmp_path / "restore"),
    )
    h = Harness(tmp_path, sock_dir / "agent.sock", quiescer=q)

    async def main() -> None:
        await h.start()
        assert h.host.channel is not None
        stopped = False
        try:
            frozen = await h.host.channel.request("freeze", {"snapshot": "s1"}, 10)
            assert frozen["frozen"] == [str(mnt)] and frozen["consistency"] == "filesystem"
            status = await h.host.channel.request("freeze_status", {}, 5)
            assert status["frozen"] is True and status["mounts"] == [str(mnt)]
            code, _, err = await h.cli("attach", "s1")
            assert code == 1 and "frozen" in err and h.host.calls == []
            thawed = await h.host.channel.request("thaw", {}, 10)
            assert thawed["thawed"] == [str(mnt)] and thawed["self_thawed"] is False
            status = await h.host.channel.request("freeze_status", {}, 5)
            assert status["frozen"] is False
            # frozen again, then the agent stops: it thaws on the way out
            await h.host.channel.request("freeze", {}, 10)
            writer = await asyncio.create_subprocess_exec("sh", "-c", f"echo x > {mnt}/after-stop")
            await h.stop()
            stopped = True
            assert await asyncio.wait_for(writer.wait(), 5) == 0
        finally:
            if not stopped:
                await h.stop()

    try:
        asyncio.run(main())
    finally:
        fd = os.open(str(mnt), os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, FITHAW, 0)
        os.close(fd)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
