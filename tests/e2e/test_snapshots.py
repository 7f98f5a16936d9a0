"""Snapshots and self-service restore on real libvirt guests (issue: app-consistent
snapshots and file-level restore).

One cluster; guest ``a`` installs the agent from its ISO and links over serial; guest ``b``
boots the same image without an agent (a second VM of the same host, for isolation). The
tests run in order and act inside ``a`` through its console (``GuestShell``):

- the fleet list shows what each VM can do (quiesced snapshots, self-service restore);
- a quiesced snapshot runs pre_freeze, freezes, snapshots, thaws, runs post_thaw — in order;
- a pre_freeze that hangs is killed at its timeout and the snapshot says crash-consistent;
- a freeze whose thaw never comes (serial-bridge killed) thaws by itself at its deadline;
- root in the guest lists its snapshots, attaches one, reads the old file, detaches;
- a restore disk is detached automatically when its time is up, unmounted first;
- a VM never reaches another VM's snapshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.client import Client

from guestbus.contract import (
    CMD_FREEZE,
    CMD_FREEZE_STATUS,
    CMD_THAW,
    RESTORE_SERIAL_PREFIX,
    FreezeResult,
    FreezeStatus,
    LinkKind,
    SnapshotRecord,
    ThawResult,
    guest_subject,
)

from . import libvirt_harness as harness
from .cluster import Cluster, wait_until
from .guest_media import wheelhouse
from .guest_shell import GuestShell

pytestmark = pytest.mark.e2e

INSTALL_TIMEOUT = 900.0
AGENT = "guestbus-agent"  # in /usr/local/sbin, linked by the installer
SCRIPT_TIMEOUT = 30.0
"""The agent's default hard timeout of pre_freeze / post_thaw."""
RESTORE_DIR = "/mnt/guestbus-restore"


@dataclass
class Site:
    cluster: Cluster
    a: harness.Guest
    b: harness.Guest
    figures: dict[str, Any]

    def detail(self) -> str:
        router = self.cluster.services["rpc-router"]
        parts = [self.a.console_tail(25), self.cluster.bridge.log_tail(40), router.log_tail(10)]
        return "\n".join(parts)

    def linked(self) -> bool:
        rec = self.cluster.records().get(self.a.uuid)
        return rec is not None and rec.link is LinkKind.SERIAL

    def wait_linked(self, timeout: float = 120.0) -> None:
        wait_until(self.linked, timeout, f"{self.a.name} linked over serial", self.detail)

    def guest_call(self, vm: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        async def work(nc: Client) -> Any:
            msg = await nc.request(
                guest_subject(vm, method), json.dumps(params).encode(), timeout=timeout
            )
            if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
                raise AssertionError(f"{method}: {msg.headers} {msg.data!r}")
            return json.loads(msg.data)

        return self.cluster.run(work)

    def shell(self) -> GuestShell:
        return GuestShell(self.a)


def write_file(sh: GuestShell, path: str, text: str, mode: str = "0700") -> None:
    blob = base64.b64encode(text.encode()).decode()
    sh.run(f"echo {blob} | base64 -d > {path} && chown root:root {path} && chmod {mode} {path}")


def restore_disks(guest: harness.Guest) -> list[str]:
    """Serials of the restore disks attached to the running domain (its live XML)."""
    root = ET.fromstring(guest.live_xml())
    serials = [d.findtext("serial") or "" for d in root.iterfind("./devices/disk")]
    return [s for s in serials if s.startswith(RESTORE_SERIAL_PREFIX)]


@pytest.fixture(scope="module")
def site(
    libvirt_conn: Any,
    guest_image: harness.GuestImage,
    tmp_path_factory: pytest.TempPathFactory,
    figures: dict[str, Any],
) -> Iterator[Site]:
    run = uuidlib.uuid4().hex[:6]
    run_dir = harness.vm_root() / f"{harness.NAME_PREFIX}snap-{run}"
    iso_dir = run_dir / "isos"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, run_dir, True)
        iso_dir.mkdir(parents=True)
        run_dir.chmod(0o755)
        iso_dir.chmod(0o755)
        house = wheelhouse()
        cluster = Cluster(
            tmp_path_factory.mktemp("snap-cluster"),
            iso_dir,
            house.path.parent,
            bridge_env={"GUESTBUS_RESTORE_CHECK_INTERVAL": "1"},
        )
        stack.callback(cluster.close)
        cluster.start()
        vm_a, vm_b = str(uuidlib.uuid4()), str(uuidlib.uuid4())
        spec_a = harness.GuestSpec(
            name=f"{harness.NAME_PREFIX}sa-{run}", uuid=vm_a, cdrom=iso_dir / f"{vm_a}.iso"
        )
        spec_b = harness.GuestSpec(name=f"{harness.NAME_PREFIX}sb-{run}", uuid=vm_b, quiet=True)
        a = stack.enter_context(harness.defined_guest(spec_a, conn=libvirt_conn, image=guest_image))
        b = stack.enter_context(harness.defined_guest(spec_b, conn=libvirt_conn, image=guest_image))
        wait_until(
            lambda: a.uuid in cluster.records(), 30, "the bridge to record a", cluster.logs_detail
        )
        built = cluster.cli_json("iso", "build", a.name, "--json", timeout=900)
        assert built[0]["ok"], built
        a.start()
        b.start()
        s = Site(cluster, a, b, figures)
        s.wait_linked(INSTALL_TIMEOUT)
        b.wait_for_console(harness.LOGIN_PROMPT, timeout=300)
        yield s
        # every service ran as its own least-privilege NATS user: that was enough
        assert cluster.violations() == [], "\n".join(cluster.violations())


@pytest.mark.timeout(INSTALL_TIMEOUT + 300)
def test_fleet_list_shows_snapshot_and_restore_capabilities(site: Site) -> None:
    def capable() -> dict[str, Any] | None:
        listed = {r["uuid"]: r for r in site.cluster.cli_json("vms", "--json")}
        rec = listed.get(site.a.uuid)
        ok = rec and {"snapshot", "restore"} <= set(rec["host_capabilities"])
        return listed if ok else None

    listed = wait_until(capable, 60, "host capabilities of a in the registry", site.detail)
    a = listed[site.a.uuid]
    assert {f"cmd:{CMD_FREEZE}", f"cmd:{CMD_THAW}", "ssr"} <= set(a["capabilities"]), a
    table = site.cluster.cli("vms")
    row_a = next(line for line in table.splitlines() if line.startswith(site.a.uuid))
    assert re.search(r"\bquiesce\s+yes\s*$", row_a), table
    # b runs no agent: the host can still take crash-consistent snapshots of it
    row_b = next(line for line in table.splitlines() if line.startswith(site.b.uuid))
    assert re.search(r"\bcrash\s+-\s*$", row_b), table


@pytest.mark.timeout(300)
def test_quiesced_snapshot_runs_the_hooks_in_order(site: Site) -> None:
    with site.shell() as sh:
        write_file(
            sh,
            "/usr/local/sbin/pre_freeze",
            '#!/bin/sh\necho "pre $(date +%s.%N)" >> /root/hooks\n',
        )
        write_file(
            sh,
            "/usr/local/sbin/post_thaw",
            '#!/bin/sh\necho "post $(date +%s.%N)" >> /root/hooks\n',
        )
        sh.run("rm -f /root/hooks")
        started = time.monotonic()
        rec = SnapshotRecord.model_validate(
            site.cluster.cli_json(
                "snapshot", "create", site.a.name, "--quiesce", "--name", "q1", "--json"
            )
        )
        site.figures["quiesced snapshot, end to end (s)"] = round(time.monotonic() - started, 2)
        assert rec.consistency.value == "application", rec
        assert [(s.step, s.ok) for s in rec.steps] == [
            ("freeze", True),
            ("snapshot", True),
            ("thaw", True),
        ], rec
        assert rec.freeze is not None and rec.thaw is not None
        assert "/" in rec.freeze.frozen and rec.thaw.thawed == list(reversed(rec.freeze.frozen))
        assert rec.freeze.pre_freeze.state.value == "ok"
        assert rec.thaw.post_thaw.state.value == "ok"
        assert rec.frozen_seconds is not None
        assert rec.frozen_seconds < rec.freeze.deadline_seconds, rec
        site.figures["file systems frozen for (s)"] = round(rec.frozen_seconds, 3)
        hooks = sh.run("cat /root/hooks").split()
        assert hooks[0::2] == ["pre", "post"], hooks
        assert float(hooks[1]) < float(hooks[3])
    # libvirt has it, and so does the listing
    assert site.a.dom.snapshotLookupByName("q1", 0).getName() == "q1"
    listed = site.cluster.cli_json("snapshot", "ls", site.a.name, "--json")["snapshots"]
    assert [(s["name"], s["consistency"]) for s in listed] == [("q1", "application")]


@pytest.mark.timeout(300)
def test_hanging_pre_freeze_is_killed_and_the_snapshot_says_crash(site: Site) -> None:
    with site.shell() as sh:
        write_file(sh, "/usr/local/sbin/pre_freeze", "#!/bin/sh\nexec sleep 601\n")
        started = time.monotonic()
        rec = SnapshotRecord.model_validate(
            site.cluster.cli_json(
                "snapshot", "create", site.a.name, "--quiesce", "--name", "hang", "--json"
            )
        )
        took = time.monotonic() - started
        assert rec.consistency.value == "crash", rec
        assert rec.freeze is not None and rec.freeze.pre_freeze.state.value == "timeout", rec
        assert rec.freeze.frozen == [], rec
        assert any("pre_freeze" in r for r in rec.reasons), rec
        assert SCRIPT_TIMEOUT - 1 <= took < SCRIPT_TIMEOUT + 30, took
        # the script's process is gone, the file systems take writes
        running = sh.run(
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"
        )
        assert not [ln for ln in running.splitlines() if ln.startswith("sleep 601")], running
        sh.run("touch /root/after-hang && sync", timeout=20)
        sh.run("rm -f /usr/local/sbin/pre_freeze /usr/local/sbin/post_thaw")
    status = FreezeStatus.model_validate(
        site.guest_call(site.a.uuid, CMD_FREEZE_STATUS, {}, timeout=15)
    )
    assert status.frozen is False


@pytest.fixture
def bridge_back(site: Site) -> Iterator[None]:
    """Whatever the test does to the serial-bridge, it runs again afterwards (the later
    tests need it)."""
    yield
    if not site.cluster.bridge.alive:
        site.cluster.bridge.start()
        site.cluster.bridge.wait_ready()


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("bridge_back")
def test_no_thaw_after_freeze_the_guest_thaws_itself(site: Site) -> None:
    deadline = 8.0
    with site.shell() as sh:
        frozen = FreezeResult.model_validate(
            site.guest_call(site.a.uuid, CMD_FREEZE, {"deadline": deadline}, timeout=60)
        )
        assert "/" in frozen.frozen and frozen.deadline_seconds == deadline, frozen
        # the host side dies before it can thaw
        site.cluster.bridge.kill()
        # a write issued now waits for the thaw; /run is tmpfs (not frozen)
        t0 = float(
            sh.run("( touch /root/probe; date +%s.%N > /run/probe-done ) & date +%s.%N").split()[-1]
        )
        done = wait_until(
            lambda: sh.run("cat /run/probe-done 2>/dev/null || true").strip(),
            deadline + 30,
            "the write to finish (the guest thawing itself)",
            site.detail,
            interval=0.5,
        )
        waited = float(done) - t0
        assert 2.0 <= waited <= deadline + 4.0, waited
        site.figures["self-thaw: write blocked for (s)"] = round(waited, 2)
    site.cluster.bridge.start()
    site.cluster.bridge.wait_ready()

    def answered() -> Any:  # the registry may still say serial from before the kill
        try:
            return site.guest_call(site.a.uuid, CMD_FREEZE_STATUS, {}, timeout=10)
        except Exception:
            return None

    status = FreezeStatus.model_validate(
        wait_until(answered, 120, "the agent to answer again over serial", site.detail)
    )
    assert status.frozen is False and status.self_thaws >= 1, status
    late = ThawResult.model_validate(site.guest_call(site.a.uuid, CMD_THAW, {}, timeout=30))
    assert late.self_thawed is True, late


@pytest.mark.timeout(400)
def test_root_in_the_guest_restores_a_file_from_a_snapshot(site: Site) -> None:
    with site.shell() as sh:
        sh.run("echo before-snapshot > /root/ssr.txt && sync")
        site.cluster.cli("snapshot", "create", site.a.name, "--quiesce", "--name", "ssr1")
        sh.run("echo after-snapshot > /root/ssr.txt && sync")

        listed = sh.run(f"{AGENT} ssr ls-snaps")
        assert "ssr1" in listed and "q1" in listed, listed

        # only root may
        refused = sh.run(
            f"setpriv --reuid=65534 --regid=65534 --clear-groups {AGENT} ssr ls-snaps; "
            "echo status=$?",
            check=False,
        )
        assert "status=0" not in refused and "root" in refused, refused

        started = time.monotonic()
        out = sh.run(f"{AGENT} ssr attach ssr1", timeout=120)
        site.figures["self-service attach + mount (s)"] = round(time.monotonic() - started, 2)
        path = f"{RESTORE_DIR}/ssr1"
        assert path in out, out
        assert sh.run(f"cat {path}/root/ssr.txt").strip() == "before-snapshot"
        assert sh.run("cat /root/ssr.txt").strip() == "after-snapshot"
        assert "Read-only" in sh.run(f"touch {path}/root/x 2>&1 || true")
        assert "ssr1" in sh.run(f"{AGENT} ssr ls-attached")
        attached = site.cluster.cli_json("snapshot", "attached", site.a.name, "--json")
        assert [(x["label"], x["requested_by"]) for x in attached["attachments"]] == [
            ("ssr1", "guest")
        ], attached
        assert len(restore_disks(site.a)) == 1

        started = time.monotonic()
        sh.run(f"{AGENT} ssr detach ssr1", timeout=120)
        site.figures["self-service unmount + detach (s)"] = round(time.monotonic() - started, 2)
        assert sh.run(f"mountpoint -q {path} && echo mounted || echo no").strip() == "no"
        assert restore_disks(site.a) == []
        attached = site.cluster.cli_json("snapshot", "attached", site.a.name, "--json")
        assert attached["attachments"] == []


@pytest.mark.timeout(300)
def test_restore_disk_is_detached_automatically_when_its_time_is_up(site: Site) -> None:
    since = site.cluster.event_seq()
    site.cluster.cli("snapshot", "attach", site.a.name, "ssr1", "--ttl", "15")
    with site.shell() as sh:
        # the guest mounts what the operator attached (attach is idempotent)
        out = sh.run(f"{AGENT} ssr attach ssr1", timeout=120)
        path = f"{RESTORE_DIR}/ssr1"
        assert path in out
        assert sh.run(f"cat {path}/root/ssr.txt").strip() == "before-snapshot"
        wait_until(
            lambda: restore_disks(site.a) == [],
            60,
            "the restore disk to be detached automatically",
            site.detail,
        )
        assert sh.run(f"mountpoint -q {path} && echo mounted || echo no").strip() == "no"
    events = [e.data for e in site.cluster.events(f"gb.evt.snapshot.{site.a.uuid}", since)]
    assert any(e["action"] == "auto_detached" and e["name"] == "ssr1" for e in events), events


@pytest.mark.timeout(300)
def test_a_vm_never_reaches_another_vms_snapshot(site: Site) -> None:
    site.cluster.cli("snapshot", "create", site.b.name, "--name", "b-only")
    with site.shell() as sh:
        listed = sh.run(f"{AGENT} ssr ls-snaps")
        assert "b-only" not in listed and "ssr1" in listed, listed
        out = sh.run(f"{AGENT} ssr attach b-only; echo status=$?", check=False, timeout=60)
        assert "status=0" not in out and "b-only" in out, out
    assert restore_disks(site.a) == []
    assert restore_disks(site.b) == []


@pytest.mark.timeout(400)
def test_deleting_snapshots_keeps_the_guests_data(site: Site) -> None:
    names = [
        s["name"]
        for s in site.cluster.cli_json("snapshot", "ls", site.a.name, "--json")["snapshots"]
    ]
    assert {"q1", "ssr1"} <= set(names), names
    for name in names:
        site.cluster.cli("snapshot", "rm", site.a.name, name, timeout=300)
    listed = site.cluster.cli_json("snapshot", "ls", site.a.name, "--json")["snapshots"]
    assert listed == []
    with site.shell() as sh:
        assert sh.run("cat /root/ssr.txt").strip() == "after-snapshot"
        sh.run("echo still-writable > /root/after-rm && sync")
    site.wait_linked(30)
