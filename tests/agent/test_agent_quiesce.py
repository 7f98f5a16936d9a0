"""Quiesce in the guest: the mount table, the scripts, and real FIFREEZE/FITHAW on ext4 file
systems the tests make and loop-mount themselves.

Every Quiescer here gets a ``mounts_fn`` that returns only this test's own loop mounts: the
machine's file systems are never frozen. Standard library + pytest only (also runs on 3.9).
"""

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from guestbus.wire import errors
from guestbus.wire.aio import RemoteError
from guestbus_agent.quiesce import (
    FITHAW,
    Mount,
    Quiescer,
    check_script,
    parse_mountinfo,
    read_mountinfo,
    run_script,
    select,
)

# --- the mount table (no root needed) ------------------------------------------------------

SAMPLE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,mode=755
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
30 27 254:2 / /boot rw,relatime shared:2 - ext4 /dev/vda2 rw
31 30 254:3 / /boot/efi rw,relatime shared:3 - vfat /dev/vda3 rw,fmask=0077
32 27 254:1 /srv/www /var/www rw,relatime shared:1 - ext4 /dev/vda1 rw
33 27 254:4 / /data\\040disk rw,noatime master:4 - xfs /dev/mapper/vg-data rw,attr2
34 27 7:0 / /mnt/iso ro,relatime - iso9660 /dev/sr0 ro
35 27 254:5 / /mnt/ro ro,relatime - ext4 /dev/vdc rw
36 27 0:40 / /home rw - nfs4 server:/home rw,vers=4.2
37 27 0:41 / /var/lib/docker/overlay2/x/merged rw - overlay overlay rw,lowerdir=a
38 27 0:42 / /run/user/1000/doc rw - fuse.portal portal rw
39 27 254:6 / /mnt/guestbus-restore/s1 ro - ext4 /dev/vdd ro,norecovery
40 27 254:7 / /mnt/guestbus-restore/s2/part1 rw - ext4 /dev/vde1 rw
41 27 0:50 / /srv/btrfs rw - btrfs /dev/vdf rw,subvol=/
42 27 0:50 /@home /srv/btrfs-home rw - btrfs /dev/vdf rw,subvol=/@home
43 27 254:8 / /mnt/tab\\011and\\134slash rw - ext4 /dev/vdg rw
"""


def points(mounts: List[Mount]) -> List[str]:
    return [m.mount_point for m in mounts]


def test_mountinfo_is_parsed_with_escapes_and_optional_fields() -> None:
    mounts = parse_mountinfo(SAMPLE + "garbage line\n")
    assert len(mounts) == SAMPLE.count("\n")
    data = next(m for m in mounts if m.mount_id == 33)
    assert data.mount_point == "/data disk" and data.fstype == "xfs"
    assert data.source == "/dev/mapper/vg-data" and data.device == "254:4"
    assert next(m for m in mounts if m.mount_id == 43).mount_point == "/mnt/tab\tand\\slash"
    assert next(m for m in mounts if m.mount_id == 32).root == "/srv/www"
    assert next(m for m in mounts if m.mount_id == 35).read_only  # per-mount ro
    assert not next(m for m in mounts if m.mount_id == 27).read_only


def test_selection_skips_pseudo_network_read_only_and_dedupes_bind_mounts() -> None:
    sel = select(parse_mountinfo(SAMPLE), [], "/mnt/guestbus-restore")
    # reverse mount-table order (children first); /var/www is a bind of / (same 254:1), the
    # second btrfs subvolume is the same file system: each frozen once, at its first mount.
    assert points(sel.freeze) == [
        "/mnt/tab\tand\\slash",
        "/srv/btrfs",
        "/data disk",
        "/boot",
        "/",
    ]
    assert sel.excluded == ["/mnt/guestbus-restore/s2/part1"]
    assert sel.notes == ["not frozen: /boot/efi (vfat cannot be frozen)"]


def test_excluding_any_mount_point_of_a_file_system_excludes_it_everywhere() -> None:
    sel = select(parse_mountinfo(SAMPLE), ["/var/www", "/boot/"], "/mnt/guestbus-restore")
    assert "/" not in points(sel.freeze) and "/boot" not in points(sel.freeze)
    assert sel.excluded == ["/", "/boot", "/var/www", "/mnt/guestbus-restore/s2/part1"]


def test_the_real_mount_table_parses() -> None:
    mounts = read_mountinfo()
    assert any(m.mount_point == "/" for m in mounts)


# --- scripts (no root needed for the checks) -----------------------------------------------


def script(path: Path, body: str, mode: int = 0o700) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(str(path), mode)
    return path


def test_script_checks_name_what_is_wrong(tmp_path: Path) -> None:
    missing = check_script(str(tmp_path / "none"))
    assert missing is not None and missing["state"] == "missing"
    s = script(tmp_path / "s", "true", 0o755)
    refused = check_script(str(s))
    assert refused is not None and refused["state"] == "refused"
    assert "mode 0755, must be 0700" in refused["reason"]
    link = tmp_path / "link"
    link.symlink_to(s)
    refused = check_script(str(link))
    assert refused is not None and "symbolic link" in refused["reason"]
    os.chmod(str(s), 0o700)
    if os.geteuid() == 0:
        assert check_script(str(s)) is None
        os.chown(str(s), 1000, 0)
        refused = check_script(str(s))
        assert refused is not None and "owned by uid 1000, must be root" in refused["reason"]


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None,
    reason="needs root and mkfs.ext4 (real loop-mounted file systems)",
)


@needs_root
def test_script_outcomes_keep_the_tail_and_exit_code(tmp_path: Path) -> None:
    ok = run_script(str(script(tmp_path / "ok", "seq 1 3000")), 5)
    assert ok["state"] == "ok" and ok["exit_code"] == 0
    assert len(ok["output"]) <= 4096 and ok["output"].endswith("3000\n")
    bad = run_script(str(script(tmp_path / "bad", "echo nope; exit 3")), 5)
    assert bad["state"] == "failed" and bad["exit_code"] == 3 and bad["output"] == "nope\n"


# --- real file systems ---------------------------------------------------------------------


class Fs:
    """ext4 images loop-mounted under one test's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: List[Path] = []

    def make(self, name: str, at: Path) -> Path:
        image = self.root / (name + ".img")
        with open(str(image), "wb") as f:
            f.truncate(16 * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        at.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(at)], check=True)
        self.mounted.append(at)
        return at

    def bind(self, source: Path, at: Path) -> Path:
        at.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(source), str(at)], check=True)
        self.mounted.append(at)
        return at

    def mounts(self) -> List[Mount]:
        """This test's mounts only: what every Quiescer here may see."""
        prefix = str(self.root) + "/"
        mine = [m for m in read_mountinfo() if m.mount_point.startswith(prefix)]
        assert all(m.source.startswith("/dev/loop") for m in mine), mine
        return mine

    def cleanup(self) -> None:
        for at in reversed(self.mounted):
            try:  # never leave one frozen, whatever the test did
                fd = os.open(str(at), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fcntl.ioctl(fd, FITHAW, 0)
                except OSError:
                    pass
                finally:
                    os.close(fd)
            except OSError:
                pass
            subprocess.run(["umount", "-l", str(at)], check=False)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Fs]:
    f = Fs(tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


def writer(path: Path) -> "subprocess.Popen[bytes]":
    """A process that writes to ``path`` (blocks while its file system is frozen)."""
    return subprocess.Popen(["sh", "-c", f"echo written > '{path}'"])


def blocked(proc: "subprocess.Popen[bytes]", for_seconds: float = 0.3) -> bool:
    try:
        proc.wait(for_seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


def running_in_group(pgid: int) -> List[int]:
    """Processes of group ``pgid`` not yet dead (zombies an init has not reaped count as dead)."""
    alive: List[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def quiescer(fs: Fs, tmp_path: Path, **kw: Any) -> Quiescer:
    kw.setdefault("pre_freeze", str(tmp_path / "pre_freeze"))
    kw.setdefault("post_thaw", str(tmp_path / "post_thaw"))
    kw.setdefault("script_timeout", 5.0)
    return Quiescer(mounts_fn=fs.mounts, restore_dir=str(tmp_path / "restore"), **kw)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@needs_root
def test_freeze_blocks_writes_until_thaw_in_order_with_both_scripts(fs: Fs, tmp_path: Path) -> None:
    parent = fs.make("a", tmp_path / "a")
    child = fs.make("b", tmp_path / "a" / "b")
    fs.bind(parent, tmp_path / "a-bind")  # the same file system: frozen once
    log = tmp_path / "log"
    # pre_freeze writes to the file system (so it is not frozen yet), post_thaw too (thawed).
    script(tmp_path / "pre_freeze", f"echo pre $GUESTBUS_SNAPSHOT >> {log}; touch {child}/pre")
    script(tmp_path / "post_thaw", f"touch {child}/post && echo post >> {log}")
    q = quiescer(fs, tmp_path)

    async def main() -> None:
        result = await q.freeze({"snapshot": "s1", "deadline": 30})
        try:
            assert result["frozen"] == [str(child), str(parent)]  # children first
            assert result["consistency"] == "application" and result["notes"] == []
            assert result["pre_freeze"]["state"] == "ok"
            assert result["deadline_seconds"] == 30
            status = q.status_now()
            assert status["frozen"] and status["mounts"] == result["frozen"]
            assert status["since"] is not None and status["deadline"] is not None
            w1, w2 = writer(parent / "f"), writer(child / "f")
            assert blocked(w1) and blocked(w2), "a write completed while frozen"
        finally:
            thaw = await q.thaw({})
        assert thaw["thawed"] == [str(parent), str(child)]  # the reverse of the freeze
        assert thaw["post_thaw"]["state"] == "ok" and not thaw["self_thawed"]
        assert thaw["frozen_seconds"] is not None and thaw["frozen_seconds"] >= 0.3
        assert w1.wait(5) == 0 and w2.wait(5) == 0
        assert (parent / "f").read_text() == "written\n"
        assert log.read_text() == "pre s1\npost\n"
        assert not q.status_now()["frozen"]
        again = await q.thaw({})  # nothing frozen any more
        assert again["thawed"] == [] and again["post_thaw"]["state"] == "skipped"

    run(main())


@needs_root
def test_no_pre_freeze_freezes_anyway_and_says_applications_were_not_quiesced(
    fs: Fs, tmp_path: Path
) -> None:
    mnt = fs.make("a", tmp_path / "a")
    q = quiescer(fs, tmp_path)

    async def main() -> None:
        result = await q.freeze({})
        try:
            assert result["frozen"] == [str(mnt)] and result["consistency"] == "filesystem"
            assert result["pre_freeze"]["state"] == "missing"
            assert any("applications were not quiesced" in n for n in result["notes"])
            assert blocked(writer(mnt / "f"))
        finally:
            thaw = await q.thaw({})
        assert thaw["thawed"] == [str(mnt)] and thaw["post_thaw"]["state"] == "missing"

    run(main())


@needs_root
@pytest.mark.parametrize("problem", ["mode", "owner"])
def test_a_refused_pre_freeze_freezes_nothing(fs: Fs, tmp_path: Path, problem: str) -> None:
    mnt = fs.make("a", tmp_path / "a")
    marker = tmp_path / "ran"
    pre = script(tmp_path / "pre_freeze", f"touch {marker}")
    if problem == "mode":
        os.chmod(str(pre), 0o755)
        why = "mode 0755, must be 0700"
    else:
        os.chown(str(pre), 1000, 1000)
        why = "owned by uid 1000, must be root"
    q = quiescer(fs, tmp_path)

    async def main() -> None:
        result = await q.freeze({})
        try:
            assert result["frozen"] == [] and result["consistency"] == "crash"
            assert result["pre_freeze"]["state"] == "refused"
            assert why in result["pre_freeze"]["reason"]
            assert any(why in n for n in result["notes"])
            assert not q.status_now()["frozen"]
            assert not blocked(writer(mnt / "f"), 5.0), "nothing should be frozen"
        finally:
            thaw = await q.thaw({})
        assert not marker.exists()
        assert thaw["thawed"] == [] and thaw["post_thaw"]["state"] == "skipped"

    run(main())


@needs_root
def test_a_hanging_pre_freeze_is_killed_with_its_group_and_nothing_is_frozen(
    fs: Fs, tmp_path: Path
) -> None:
    mnt = fs.make("a", tmp_path / "a")
    pgid_file = tmp_path / "pgid"
    script(tmp_path / "pre_freeze", f"sleep 60 & echo $$ > {pgid_file}; sleep 60")
    script(tmp_path / "post_thaw", f"echo resumed > {tmp_path}/post")
    q = quiescer(fs, tmp_path, script_timeout=0.5)

    async def main() -> None:
        started = time.monotonic()
        result = await q.freeze({})
        try:
            assert time.monotonic() - started < 4
            assert result["pre_freeze"]["state"] == "timeout"
            assert result["frozen"] == [] and result["consistency"] == "crash"
            pgid = int(pgid_file.read_text())
            assert running_in_group(pgid) == []  # the script and its child are gone
            assert not blocked(writer(mnt / "f"), 5.0)
            with pytest.raises(RemoteError) as err:  # post_thaw is still owed
                await q.freeze({})
            assert err.value.code == errors.FROZEN
        finally:
            thaw = await q.thaw({})
        # pre_freeze started (it may have quiesced something): thaw lets applications resume
        assert thaw["thawed"] == [] and thaw["post_thaw"]["state"] == "ok"
        assert (tmp_path / "post").read_text() == "resumed\n"

    run(main())


@needs_root
def test_without_thaw_the_guest_thaws_itself_at_the_deadline(fs: Fs, tmp_path: Path) -> None:
    mnt = fs.make("a", tmp_path / "a")
    script(tmp_path / "pre_freeze", "true")
    script(tmp_path / "post_thaw", f"echo resumed > {tmp_path}/post")
    q = quiescer(fs, tmp_path, deadline=60)

    async def main() -> None:
        result = await q.freeze({"deadline": 1.5})
        assert result["deadline_seconds"] == 1.5 and result["frozen"] == [str(mnt)]
        w = writer(mnt / "f")
        assert blocked(w, 1.0)
        # Nobody calls thaw: the write completes once the guard thawed by itself.
        assert w.wait(5) == 0
        deadline = time.monotonic() + 5
        while not (tmp_path / "post").exists():
            assert time.monotonic() < deadline, "post_thaw did not run after the self-thaw"
            await asyncio.sleep(0.05)
        status = q.status_now()
        assert not status["frozen"] and status["self_thaws"] == 1
        assert status["last_self_thaw"] is not None
        thaw = await q.thaw({})
        assert thaw["self_thawed"] is True and thaw["thawed"] == [str(mnt)]
        assert thaw["post_thaw"]["state"] == "ok"
        assert 1.4 <= thaw["frozen_seconds"] < 5
        # the next freeze starts afresh
        result = await q.freeze({})
        thaw = await q.thaw({})
        assert result["frozen"] == [str(mnt)] and thaw["self_thawed"] is False
        assert q.status_now()["self_thaws"] == 1

    run(main())


@needs_root
def test_a_second_freeze_while_frozen_is_refused(fs: Fs, tmp_path: Path) -> None:
    fs.make("a", tmp_path / "a")
    q = quiescer(fs, tmp_path)

    async def main() -> None:
        await q.freeze({})
        try:
            with pytest.raises(RemoteError) as err:
                await q.freeze({})
            assert err.value.code == errors.FROZEN
        finally:
            await q.thaw({})

    run(main())


@needs_root
def test_excluded_mount_points_are_not_frozen(fs: Fs, tmp_path: Path) -> None:
    a = fs.make("a", tmp_path / "a")
    b = fs.make("b", tmp_path / "b")
    restore = fs.make("r", tmp_path / "restore" / "snap")  # under the restore dir
    q = quiescer(fs, tmp_path, exclude=[str(b)])

    async def main() -> None:
        result = await q.freeze({})
        try:
            assert result["frozen"] == [str(a)]
            assert result["excluded"] == [str(b), str(restore)]
            assert not blocked(writer(b / "f"), 5.0)
            assert not blocked(writer(restore / "f"), 5.0)
            assert blocked(writer(a / "f"))
        finally:
            await q.thaw({})

    run(main())


@needs_root
def test_the_agent_stopping_thaws(fs: Fs, tmp_path: Path) -> None:
    mnt = fs.make("a", tmp_path / "a")
    q = quiescer(fs, tmp_path)

    async def main() -> None:
        await q.freeze({})
        w = writer(mnt / "f")
        assert blocked(w)
        q.shutdown()
        assert w.wait(5) == 0

    run(main())


def test_deadline_is_capped_by_the_config_and_validated() -> None:
    q = Quiescer(mounts_fn=lambda: [], pre_freeze="", post_thaw="", deadline=2)

    async def main() -> None:
        result = await q.freeze({"deadline": 100})
        await q.thaw({})
        assert result["deadline_seconds"] == 2 and result["consistency"] == "filesystem"
        for bad in ({"deadline": 0}, {"deadline": "5"}, {"deadline": 601}, {"snapshot": 5}):
            with pytest.raises(RemoteError) as err:
                await q.freeze(bad)
            assert err.value.code == errors.BAD_REQUEST

    run(main())


def test_thaw_without_freeze_skips_post_thaw(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    post = script(tmp_path / "post_thaw", f"touch {marker}")
    q = Quiescer(mounts_fn=lambda: [], pre_freeze="", post_thaw=str(post))
    thaw = run(q.thaw({}))
    assert thaw["thawed"] == [] and thaw["post_thaw"]["state"] == "skipped"
    assert not marker.exists()


# The freeze path imports nothing lazily: an import may write a .pyc to a frozen disk.
LAZY_IMPORT_CHECK = """
import asyncio, json, sys
from guestbus_agent.quiesce import Quiescer

async def main():
    q = Quiescer(mounts_fn=lambda: [], pre_freeze="", post_thaw="")
    await q.freeze({})
    before = set(sys.modules)
    q.status_now()
    await q.status({})
    q._expire(q._generation, 1.0)  # what the guard does at the deadline
    await q.thaw({})
    print(json.dumps(sorted(set(sys.modules) - before)))

asyncio.run(main())
"""


def test_nothing_is_imported_between_freeze_and_thaw() -> None:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "agent")])
    out = subprocess.run(
        [sys.executable, "-c", LAZY_IMPORT_CHECK],
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout) == []


def test_the_guard_thread_is_a_thread(tmp_path: Path) -> None:
    """The deadline guard must not depend on the event loop (it may be blocked)."""
    q = Quiescer(mounts_fn=lambda: [], pre_freeze="", post_thaw="", deadline=0.2)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(q.freeze({}))
    finally:
        loop.close()  # no loop runs any more: the guard must still fire
    deadline = time.monotonic() + 3
    while q._self_thaw is None:
        assert time.monotonic() < deadline, "the guard did not fire without a loop"
        time.sleep(0.02)
