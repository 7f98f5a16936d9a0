"""Real re-IP: agent processes inside network namespaces the test creates, changed by a run.

Each lab VM is a network namespace with an ``eth0`` (one end of a veth pair whose other end
is on a bridge in a "recovery site" namespace that holds the new gateways). Its agent is a
real ``guestbus-agent`` process started with ``ip netns exec`` on the VM's serial pty, so
every ``ip`` command it runs changes that namespace. The test reads the result back with
``ip -j`` inside each namespace, and the network files each guest's stack would boot with
(netplan, ifupdown, NetworkManager) under the agent's ``--dr-root``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from guestbus.contract import DrRunState, DrVmState

from ._support import DrStack, by_vm

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2",
)
PREFIX = f"gbdr{os.getpid() % 100000}"
SITE = f"{PREFIX}-site"


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def ipj(*args: str, ns: str) -> list[dict[str, Any]]:
    data = json.loads(ip("-j", *args, ns=ns) or "[]")
    assert isinstance(data, list)
    return data


def addresses(ns: str, family: str = "inet") -> list[str]:
    out = []
    for link in ipj("addr", "show", "dev", "eth0", ns=ns):
        for a in link.get("addr_info", []):
            if a.get("family") == family and a.get("scope") == "global":
                out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def default_via(ns: str, family: str = "-4") -> list[str]:
    return [r["gateway"] for r in ipj(family, "route", "show", "default", ns=ns) if "gateway" in r]


@pytest.fixture(scope="module")
def namespaces() -> Iterator[list[str]]:
    """A recovery site (bridge with the new gateways) and four VM namespaces on it."""
    names = [f"{PREFIX}-{i}" for i in range(4)]
    try:
        ip("netns", "add", SITE)
        ip("link", "add", "br0", "type", "bridge", ns=SITE)
        ip("link", "set", "br0", "up", ns=SITE)
        ip("addr", "add", "10.9.0.1/16", "dev", "br0", ns=SITE)
        ip("addr", "add", "fd09::1/64", "dev", "br0", "nodad", ns=SITE)
        for i, ns in enumerate(names):
            ip("netns", "add", ns)
            ip("link", "add", f"{PREFIX}v{i}", "type", "veth", "peer", "name", f"{PREFIX}p{i}")
            ip("link", "set", f"{PREFIX}v{i}", "netns", ns, "name", "eth0")
            ip("link", "set", f"{PREFIX}p{i}", "netns", SITE)
            ip("link", "set", f"{PREFIX}p{i}", "master", "br0", "up", ns=SITE)
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                 "net.ipv6.conf.default.accept_dad=0"],
                check=False, capture_output=True,
            )  # fmt: skip
            ip("link", "set", "lo", "up", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)
            ip("addr", "add", f"10.0.0.{10 + i}/16", "dev", "eth0", ns=ns)
            ip("route", "add", "default", "via", "10.0.0.1", "dev", "eth0", ns=ns)
        ip("addr", "add", "fd00::10/64", "dev", "eth0", "nodad", ns=names[0])
        ip("-6", "route", "add", "default", "via", "fd00::1", "dev", "eth0", ns=names[0])
        yield names
    finally:
        for ns in [*names, SITE]:
            ip("netns", "del", ns, check=False)


def guest_files(root: Path, kind: str) -> None:
    """What each guest's network stack had before the failover."""
    if kind == "netplan":
        (root / "etc/netplan").mkdir(parents=True)
        (root / "etc/netplan/50-cloud-init.yaml").write_text(
            "network:\n  version: 2\n  ethernets:\n"
            "    eth0:\n      addresses: [10.0.0.10/16]\n      routes:\n"
            "        - to: default\n          via: 10.0.0.1\n"
            "    eth1:\n      dhcp4: true\n"
        )
    elif kind == "ifupdown":
        (root / "etc/network").mkdir(parents=True)
        (root / "etc/network/interfaces").write_text(
            "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n"
            "    address 10.0.0.11/16\n    gateway 10.0.0.1\n"
        )
    elif kind == "networkmanager":
        (root / "etc/NetworkManager/system-connections").mkdir(parents=True)
        (root / "etc/NetworkManager/system-connections/Wired.nmconnection").write_text(
            "[connection]\nid=Wired\nuuid=7f3c0a56-1111-4222-8333-944455556666\ntype=ethernet\n"
            "interface-name=eth0\n\n[ipv4]\nmethod=manual\naddress1=10.0.0.12/16\n"
            "gateway=10.0.0.1\n\n[ipv6]\nmethod=auto\n"
        )


@pytest.fixture(scope="module")
async def netns_stack(
    tmp_path_factory: pytest.TempPathFactory, namespaces: list[str]
) -> AsyncIterator[tuple[DrStack, list[str], list[Path]]]:
    dr = DrStack(tmp_path_factory.mktemp("dr-netns"), agents="processes", mode="pty")
    roots = [tmp_path_factory.mktemp(f"guest{i}") for i in range(len(namespaces))]
    for root, kind in zip(roots, ("netplan", "ifupdown", "networkmanager", "none"), strict=True):
        guest_files(root, kind)
    try:
        await dr.start()
        await dr.orchestrator("dr-netns")
        vms = []
        for ns, root in zip(namespaces, roots, strict=True):
            vm = await dr.fleet.add_vm(agent=False)
            await dr.fleet.start_agent(
                vm,
                prefix=["ip", "netns", "exec", ns],
                args=["--dr-root", str(root), "--log-level", "ERROR"],
            )
            vms.append(vm.uuid)
        await dr.link.wait_registered(vms, timeout=30)
        yield dr, vms, roots
    finally:
        await dr.close()


async def test_failover_re_ips_guests_in_their_namespaces(
    netns_stack: tuple[DrStack, list[str], list[Path]], namespaces: list[str]
) -> None:
    dr, vms, roots = netns_stack
    rollback = vms[3]
    plan = {
        "name": "netns",
        "mappings": [
            {"source": "10.0.0.0/16", "target": "10.9.0.0/16", "gateway": "10.9.0.1",
             "dns": ["10.9.0.53"], "search": ["site-b.example"]},
            {"source": "fd00::/64", "target": "fd09::/64", "gateway": "fd09::1"},
        ],
        "vms": [{"vm": rollback, "addresses": ["10.66.0.5/16"], "gateway": "10.66.0.1"}],
        "groups": [vms],
        "timeouts": {"link": 20, "apply": 15, "gateway": 3},
    }  # fmt: skip
    await dr.call("plan.put", {"plan": plan})
    run = (await dr.call("run.start", {"plan": "netns"}))["id"]
    reply = await dr.wait_run(run, timeout=45)
    status = by_vm(reply)
    assert reply.run.state is DrRunState.FAILED  # the rollback VM

    for i in range(3):
        ns, vm = namespaces[i], vms[i]
        assert status[vm].state is DrVmState.APPLIED, status[vm].reason
        assert addresses(ns) == [f"10.9.0.{10 + i}/16"]
        assert default_via(ns) == ["10.9.0.1"]
        resolv = (roots[i] / "etc/resolv.conf").read_text()
        assert "nameserver 10.9.0.53" in resolv and "search site-b.example" in resolv
    assert addresses(namespaces[0], "inet6") == ["fd09::10/64"]
    assert default_via(namespaces[0], "-6") == ["fd09::1"]
    neighbours = ipj("neigh", "show", "to", "10.9.0.1", ns=namespaces[1])
    assert neighbours and neighbours[0].get("lladdr")  # the gateway answered ARP

    # persisted through each guest's own stack
    netplan = roots[0] / "etc/netplan"
    ours = (netplan / "90-guestbus-dr-eth0.yaml").read_text()
    assert '"10.9.0.10/16"' in ours and '"fd09::10/64"' in ours and 'via: "10.9.0.1"' in ours
    theirs = (netplan / "50-cloud-init.yaml").read_text()
    assert "eth0" not in theirs and "eth1:" in theirs  # the other interface is kept
    assert (netplan / "50-cloud-init.yaml.guestbus-dr-bak").read_text().count("eth0") == 1
    ifupdown = (roots[1] / "etc/network/interfaces").read_text()
    assert "address 10.9.0.11/16" in ifupdown and "gateway 10.9.0.1" in ifupdown
    assert "10.0.0.11" not in ifupdown and "iface lo inet loopback" in ifupdown
    keyfile = (roots[2] / "etc/NetworkManager/system-connections/Wired.nmconnection").read_text()
    assert "address1=10.9.0.12/16" in keyfile and "gateway=10.9.0.1" in keyfile
    assert "uuid=7f3c0a56-1111-4222-8333-944455556666" in keyfile  # the same profile, edited
    assert any("netplan:" in p for p in status[vms[0]].persisted)

    # the VM whose new gateway does not answer is rolled back to what it had
    failed = status[rollback]
    assert failed.state is DrVmState.FAILED and failed.reason is not None
    assert "gateway 10.66.0.1 not reachable through eth0 within 3 s" in failed.reason
    assert "rolled back to 10.0.0.13/16" in failed.reason
    assert addresses(namespaces[3]) == ["10.0.0.13/16"]
    assert default_via(namespaces[3]) == ["10.0.0.1"]
    assert not (roots[3] / "etc/resolv.conf").exists()
