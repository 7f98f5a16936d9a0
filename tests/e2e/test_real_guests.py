"""The real hypervisor tier with the real services: libvirt/QEMU guests that install the agent
from the ISO iso-builder made for them and link up over their real UART.

The flow an operator follows, per guest: define the domain (its persistent XML lands in
/etc/libvirt/qemu) → the serial-bridge, reading libvirt's own XML directories, records the
VM → ``guestbus iso build`` makes its full ISO where the domain's CD-ROM points → start → the
first boot installs the agent offline from the ISO → the agent says hello over ttyS1.

The module's tests share one fleet of two guests (booted in parallel) and run in order:
install and link, the agent's footprint, a serial-bridge restart, a destroyed and restarted
domain, a clone. Figures go to the run's summary (``figures``) and docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import platform
import re
import shutil
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from guestbus.contract import LinkKind, LinkState, VmRecord

from . import libvirt_harness as harness
from .cluster import BRIDGE_HOST, Cluster, wait_until
from .guest_media import wheelhouse

pytestmark = pytest.mark.e2e

INSTALL_TIMEOUT = 900.0
"""Two guests installing at once under TCG on a shared 2-core machine: 85-157 s seen."""
BOOT_TIMEOUT = 300.0
IDLE_SECONDS = 35.0

# Console lines the guest image prints (e2e/guest_image.py), timed as they appear.
MARKERS = {
    "login": harness.LOGIN_PROMPT,
    "media": re.compile(r"guestbus-firstboot: found the GUESTBUS media"),
    "firstboot": harness.FIRSTBOOT_RESULT,
}
INSTALL_DURATION = re.compile(r"guestbus-firstboot: install.sh finished with status 0 after (\d+)s")
KERNEL_BANNER = re.compile(r"Linux version \S+")


@dataclass
class Watched:
    """A guest and when (seconds after its start) each console marker first appeared."""

    guest: harness.Guest
    seen: dict[str, float] = field(default_factory=dict)

    def poll(self) -> None:
        if self.guest.started_at is None:
            return
        text = self.guest.console_text()
        for key, regex in MARKERS.items():
            if key not in self.seen and regex.search(text):
                self.seen[key] = time.monotonic() - self.guest.started_at

    def restart_clock(self) -> None:
        self.seen.clear()


@dataclass
class Fleet:
    cluster: Cluster
    a: Watched
    b: Watched
    image: harness.GuestImage
    conn: Any
    run_dir: Path
    manifests: dict[str, dict[str, Any]]
    figures: dict[str, Any]

    @property
    def watched(self) -> list[Watched]:
        return [self.a, self.b]

    def _with(self, extra: tuple[Watched, ...]) -> list[Watched]:
        return [*self.watched, *(w for w in extra if all(w is not x for x in self.watched))]

    def detail(self, *extra: Watched) -> str:
        parts = [w.guest.console_tail(30) for w in self._with(extra)]
        parts.append(self.cluster.bridge.log_tail(30))
        parts.append(self.cluster.services["rpc-router"].log_tail(15))
        return "\n".join(parts)

    def poll(self, *extra: Watched) -> None:
        for w in self._with(extra):
            w.poll()

    def linked(self, *watched: Watched) -> dict[str, VmRecord] | None:
        """The registry when every given guest's link is ``serial``; a stopped guest fails."""
        self.poll(*watched)
        for w in watched:
            if not w.guest.is_active():
                raise AssertionError(f"{w.guest.name} stopped\n{self.detail(*watched)}")
        records = self.cluster.records()
        ok = all(
            w.guest.uuid in records and records[w.guest.uuid].link is LinkKind.SERIAL
            for w in watched
        )
        return records if ok else None

    def wait_linked(self, *watched: Watched, timeout: float) -> dict[str, VmRecord]:
        names = ", ".join(w.guest.name for w in watched)
        return wait_until(
            lambda: self.linked(*watched),
            timeout,
            f"link serial for {names} in the registry",
            lambda: self.detail(*watched),
        )

    def certs(self, vm: str) -> list[dict[str, Any]]:
        listed = self.cluster.cli_json("cert", "list", "--vm", vm, "--json")
        return list(listed["certificates"])


def hello_at(fleet: Fleet, w: Watched, since: int) -> float:
    """Seconds from the guest's start to its link's ``up`` event (the agent's hello)."""
    ups = [e for e in fleet.cluster.link_events(w.guest.uuid, since) if e.state is LinkState.UP]
    assert ups, f"no link up event for {w.guest.name}"
    assert w.guest.started_wall is not None
    return ups[0].at.timestamp() - w.guest.started_wall


@pytest.fixture(scope="module")
def fleet(
    libvirt_conn: Any,
    guest_image: harness.GuestImage,
    tmp_path_factory: pytest.TempPathFactory,
    figures: dict[str, Any],
) -> Iterator[Fleet]:
    """Two guests defined, discovered, given their full ISOs through the bus, started in
    parallel, installed from their ISOs and linked over serial."""
    run = uuidlib.uuid4().hex[:6]
    run_dir = harness.vm_root() / f"{harness.NAME_PREFIX}run-{run}"
    iso_dir = run_dir / "isos"  # iso-builder's output dir, where the CD-ROMs point
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, run_dir, True)
        iso_dir.mkdir(parents=True)
        run_dir.chmod(0o755)
        iso_dir.chmod(0o755)
        house = wheelhouse()  # the services' wheelhouse cache: built once, shared with tests
        cluster = Cluster(tmp_path_factory.mktemp("cluster"), iso_dir, house.path.parent)
        stack.callback(cluster.close)
        t0 = time.monotonic()
        cluster.start()
        figures["services ready (s)"] = round(time.monotonic() - t0, 1)

        watched = []
        for letter in "ab":
            vm = str(uuidlib.uuid4())
            spec = harness.GuestSpec(
                name=f"{harness.NAME_PREFIX}{letter}-{run}", uuid=vm, cdrom=iso_dir / f"{vm}.iso"
            )
            guest = stack.enter_context(
                harness.defined_guest(spec, conn=libvirt_conn, image=guest_image)
            )
            watched.append(Watched(guest))
        a, b = watched

        # The bridge found the defined (not yet running) domains in /etc/libvirt/qemu.
        def discovered() -> dict[str, VmRecord] | None:
            records = cluster.records()
            ok = all(w.guest.uuid in records for w in watched)
            return records if ok else None

        records = wait_until(
            discovered, 30, "the bridge to record both domains", cluster.logs_detail
        )
        for w in watched:
            record = records[w.guest.uuid]
            assert (record.name, record.host, record.link) == (
                w.guest.name,
                BRIDGE_HOST,
                LinkKind.DOWN,
            )

        t0 = time.monotonic()
        built = cluster.cli_json("iso", "build", a.guest.name, b.guest.name, "--json", timeout=900)
        figures["full ISOs for both, through the bus (s)"] = round(time.monotonic() - t0, 1)
        manifests = {}
        for result in built:
            assert result["ok"], result
            manifests[result["vm"]] = result["manifest"]
        for w in watched:
            manifest = manifests[w.guest.uuid]
            assert manifest["kind"] == "full"
            assert manifest["path"] == str(w.guest.iso) and w.guest.iso is not None
            assert w.guest.iso.is_file()

        fleet = Fleet(cluster, a, b, guest_image, libvirt_conn, run_dir, manifests, figures)
        since = cluster.event_seq()
        t0 = time.monotonic()
        for w in watched:
            w.guest.start()
        fleet.wait_linked(a, b, timeout=INSTALL_TIMEOUT)
        figures["both guests installed and linked, from start (s)"] = round(
            time.monotonic() - t0, 1
        )
        for w in watched:
            key = w.guest.name.split("-")[1]
            figures[f"guest {key}: start to login prompt (s)"] = round(w.seen.get("login", -1), 1)
            figures[f"guest {key}: start to agent hello (s)"] = round(hello_at(fleet, w, since), 1)
            found = INSTALL_DURATION.search(w.guest.console_text())
            if found:
                figures[f"guest {key}: install.sh from the ISO (s)"] = int(found.group(1))
        yield fleet
        # every service ran as its own least-privilege NATS user: that was enough
        assert cluster.violations() == [], "\n".join(cluster.violations())


@pytest.mark.timeout(INSTALL_TIMEOUT + 600)
def test_two_guests_install_from_their_isos_and_link_over_serial(fleet: Fleet) -> None:
    """Both guests installed the agent offline from their own ISO at first boot, appear in
    ``guestbus vms --json`` with link ``serial``, and answer ``ping`` and ``info`` from
    inside: the guest's hostname, the guest's kernel (not this host's)."""
    listed = {r["uuid"]: r for r in fleet.cluster.cli_json("vms", "--json")}
    house_version = wheelhouse().agent_version
    for w in fleet.watched:
        guest = w.guest
        assert guest.wait_for_firstboot(timeout=10) == "installed", guest.console_tail()
        record = listed[guest.uuid]
        assert record["link"] == "serial", record
        assert record["name"] == guest.name
        assert record["host"] == BRIDGE_HOST
        assert record["agent_version"] == house_version
        assert record["config_uuid"] == fleet.manifests[guest.uuid]["config_uuid"]

        pong = fleet.cluster.cli("ping", guest.name, "-c", "2")
        assert pong.count(f"pong from {guest.name} via serial@{BRIDGE_HOST}") == 2, pong

        info = fleet.cluster.cli_json("info", guest.name, "--json")
        assert info["vm"] == guest.uuid
        assert info["hostname"] == guest.name
        assert info["kernel"] == fleet.image.manifest["kernel"]
        assert info["kernel"] != platform.release(), "the kernel is this host's"
        assert "Debian GNU/Linux 12" in info["os"]
        assert info["agent_version"] == house_version

        # the ISO's identity: the one certificate of the VM is the one iso-builder issued
        serials = [c["serial"] for c in fleet.certs(guest.name)]
        assert serials == [fleet.manifests[guest.uuid]["cert_serial"]]


@pytest.mark.timeout(300)
def test_agent_footprint_when_idle(fleet: Fleet, figures: dict[str, Any]) -> None:
    """The agent's resident memory and CPU use over >= 30 s with nothing to do but heartbeats,
    as the agent itself reports them in ``info``."""
    fleet.wait_linked(fleet.a, fleet.b, timeout=60)
    first = {
        w.guest.name: fleet.cluster.cli_json("info", w.guest.name, "--json") for w in fleet.watched
    }
    time.sleep(IDLE_SECONDS)
    for w in fleet.watched:
        name = w.guest.name
        second = fleet.cluster.cli_json("info", name, "--json")
        assert second["uptime"] > first[name]["uptime"], "the same boot"
        elapsed = second["uptime"] - first[name]["uptime"]
        cpu = second["agent_cpu_seconds"] - first[name]["agent_cpu_seconds"]
        rss = second["agent_rss_bytes"]
        assert elapsed >= 30
        assert 0 <= cpu < elapsed * 0.5, f"the idle agent used {cpu:.2f}s CPU in {elapsed:.0f}s"
        assert 5 << 20 < rss < 200 << 20, f"agent RSS {rss} bytes"
        key = name.split("-")[1]
        figures[f"guest {key}: agent RSS (MiB)"] = round(rss / (1 << 20), 1)
        figures[f"guest {key}: agent idle CPU (% of one vCPU over {elapsed:.0f}s)"] = round(
            100 * cpu / elapsed, 2
        )
        figures[f"guest {key}: agent CPU since start (s)"] = round(second["agent_cpu_seconds"], 2)


@pytest.mark.timeout(300)
def test_serial_bridge_restart_links_come_back_on_their_own(
    fleet: Fleet, figures: dict[str, Any]
) -> None:
    """Stop the serial-bridge process (SIGTERM) and start it again: both links go down and
    come back without anyone touching the guests."""
    cluster = fleet.cluster
    fleet.wait_linked(fleet.a, fleet.b, timeout=60)
    since = cluster.event_seq()
    assert cluster.bridge.stop() == 0, cluster.bridge.log_tail()

    def both_down() -> bool:
        records = cluster.records()
        return all(records[w.guest.uuid].link is LinkKind.DOWN for w in fleet.watched)

    wait_until(both_down, 30, "both VMs down in the registry", cluster.logs_detail)
    for w in fleet.watched:
        downs = [e for e in cluster.link_events(w.guest.uuid, since) if e.state is LinkState.DOWN]
        assert downs and downs[0].host == BRIDGE_HOST, downs

    time.sleep(5)  # a heartbeat or so goes unanswered meanwhile
    restarted = time.monotonic()
    cluster.bridge.start()
    cluster.bridge.wait_ready()
    fleet.wait_linked(fleet.a, fleet.b, timeout=120)
    figures["bridge restart: start to both links up (s)"] = round(time.monotonic() - restarted, 1)
    for w in fleet.watched:
        events = cluster.link_events(w.guest.uuid, since)
        assert [e.state for e in events] == [LinkState.DOWN, LinkState.UP], events
        pong = cluster.cli("ping", w.guest.name)
        assert f"pong from {w.guest.name} via serial@{BRIDGE_HOST}" in pong


@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_destroyed_and_started_domain_links_again_with_the_same_identity(
    fleet: Fleet, figures: dict[str, Any]
) -> None:
    """``virsh destroy`` (power off) and start of one domain: its link goes down (event),
    comes back up after the reboot with the same uuid, config and certificate (no new
    enrollment); the other guest is unaffected."""
    cluster, a, b = fleet.cluster, fleet.a, fleet.b
    before = fleet.wait_linked(a, b, timeout=60)
    certs_before = fleet.certs(a.guest.name)
    since = cluster.event_seq()

    a.guest.destroy()
    downs = wait_until(
        lambda: [e for e in cluster.link_events(a.guest.uuid, since) if e.state is LinkState.DOWN],
        30,
        f"a link down event for {a.guest.name}",
        fleet.detail,
    )
    assert downs[0].host == BRIDGE_HOST and downs[0].link is LinkKind.SERIAL
    wait_until(
        lambda: cluster.records()[a.guest.uuid].link is LinkKind.DOWN,
        30,
        f"{a.guest.name} down in the registry",
        fleet.detail,
    )
    assert cluster.records()[b.guest.uuid].link is LinkKind.SERIAL

    a.restart_clock()
    a.guest.start()
    after = fleet.wait_linked(a, timeout=BOOT_TIMEOUT)
    figures["destroyed guest: start to agent hello again (s)"] = round(hello_at(fleet, a, since), 1)
    assert a.guest.wait_for_firstboot(timeout=30) == "present"  # no second install
    events = cluster.link_events(a.guest.uuid, since)
    assert [e.state for e in events] == [LinkState.DOWN, LinkState.UP], events

    old, new = before[a.guest.uuid], after[a.guest.uuid]
    assert new.uuid == old.uuid and new.name == old.name
    assert new.config_uuid == old.config_uuid == fleet.manifests[a.guest.uuid]["config_uuid"]
    assert new.last_hello is not None and old.last_hello is not None
    assert new.last_hello > old.last_hello
    assert fleet.certs(a.guest.name) == certs_before  # no re-enrollment, no new certificate
    info = cluster.cli_json("info", a.guest.name, "--json")
    assert info["vm"] == a.guest.uuid and info["hostname"] == a.guest.name
    assert info["uptime"] < time.monotonic() - (a.guest.started_at or 0) + 5  # rebooted


@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_a_clone_gets_its_own_identity_over_serial_without_iso_or_reboot(
    fleet: Fleet, figures: dict[str, Any]
) -> None:
    """A second domain from guest b's disk (a block-level snapshot of the running guest,
    copied), with a new uuid and no ISO: at its first boot its agent says hello with b's
    identity, the bridge stamps the clone's, the agent adopts it and enrolls a certificate
    over serial — in the same boot. b keeps its own identity and certificate."""
    cluster, b = fleet.cluster, fleet.b
    template_before = fleet.wait_linked(b, timeout=60)[b.guest.uuid]
    template_certs = fleet.certs(b.guest.name)
    frozen = b.guest.freeze_disk()

    run = b.guest.name.rsplit("-", 1)[1]
    spec = harness.GuestSpec(name=f"{harness.NAME_PREFIX}clone-{run}", disk_from=frozen, cdrom=None)
    assert spec.uuid != b.guest.uuid
    with harness.defined_guest(spec, conn=fleet.conn, image=fleet.image) as guest:
        clone = Watched(guest)
        assert guest.iso is None  # an empty CD-ROM drive: no ISO for the clone
        wait_until(
            lambda: guest.uuid in cluster.records(),
            30,
            "the bridge to record the clone's domain",
            cluster.logs_detail,
        )
        since = cluster.event_seq()
        guest.start()

        def enrolled() -> list[dict[str, Any]] | None:
            fleet.linked(clone)
            return fleet.certs(guest.uuid) or None

        certs = wait_until(
            enrolled,
            BOOT_TIMEOUT,
            f"a certificate enrolled by {guest.name}",
            lambda: fleet.detail(clone),
        )
        figures["clone: start to its own certificate (s)"] = round(
            time.monotonic() - (guest.started_at or 0), 1
        )
        records = fleet.wait_linked(clone, b, timeout=60)
        text = guest.console_text()
        assert guest.wait_for_firstboot(timeout=10) == "present"  # installed on b's disk
        assert f"according to the host, but the config says {b.guest.uuid} (a clone)" in text
        assert len(KERNEL_BANNER.findall(text)) == 1, "the clone rebooted"

        # the clone: its own uuid, config and certificate, by the CLI
        assert len(certs) == 1 and certs[0]["vm"] == guest.uuid, certs
        listed = cluster.cli("cert", "list", "--vm", guest.name)
        assert certs[0]["serial"] in listed and "1 certificate" in listed, listed
        assert certs[0]["serial"] not in {c["serial"] for c in template_certs}

        # its first hello carried b's config; the heartbeats after it carry the clone's own
        def own_config() -> VmRecord | None:
            record = cluster.records()[guest.uuid]
            return record if record.config_uuid not in (None, template_config) else None

        template_config = template_before.config_uuid
        record = wait_until(
            own_config,
            30,
            "the clone's own config in the registry",
            lambda: repr(cluster.records()[guest.uuid]),
        )
        assert record.name == guest.name and record.host == BRIDGE_HOST
        info = cluster.cli_json("info", guest.name, "--json")
        assert info["vm"] == guest.uuid and info["hostname"] == guest.name
        assert [e.state for e in cluster.link_events(guest.uuid, since)][:1] == [LinkState.UP]

        # the template: untouched
        assert fleet.certs(b.guest.name) == template_certs
        template = records[b.guest.uuid]
        assert template.config_uuid == template_before.config_uuid
        assert template.link is LinkKind.SERIAL
        pong = cluster.cli("ping", b.guest.name)
        assert f"pong from {b.guest.name} via serial@{BRIDGE_HOST}" in pong
        vms = {r["uuid"]: r for r in cluster.cli_json("vms", "--json")}
        assert {vms[v]["link"] for v in (fleet.a.guest.uuid, b.guest.uuid, guest.uuid)} == {
            "serial"
        }
