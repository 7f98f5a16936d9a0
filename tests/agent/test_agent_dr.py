"""The agent's DR side: signature checks, apply-once memory, rollback, the network files it
writes, and the recovery script runner.

Standard library + cryptography + pytest only, so it also runs on the guest Python (3.9).
"""

import asyncio
import base64
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guestbus.wire.aio import RemoteError
from guestbus_agent.dr import CONTEXT, DrAgent, DrOptions
from guestbus_agent.netconf import (
    NetError,
    Persist,
    Route,
    Simulated,
    Stacks,
    ifupdown_replace,
    netplan_remove,
    render_netplan,
    render_nm,
    render_resolv_conf,
)
from guestbus_agent.recovery import TAIL_BYTES, run_script

VM = "5b0c1e2a-1111-4222-8333-944455556666"
MAC = "52:54:00:12:34:56"


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.path = tmp / "dr-verify.pem"
        self.path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(
        self, payload: Dict[str, Any], key: Optional[Ed25519PrivateKey] = None
    ) -> Dict[str, Any]:
        text = json.dumps(payload)
        sig = (key or self.key).sign(CONTEXT + text.encode())
        return {"payload": text, "signature": base64.b64encode(sig).decode()}


def network(
    run: str, addresses: List[str], issued: Optional[float] = None, **over: Any
) -> Dict[str, Any]:
    now = time.time() if issued is None else issued
    payload: Dict[str, Any] = {
        "v": 1, "type": "network", "run": run, "plan": "p", "kind": "failover", "vm": VM,
        "issued_at": now, "not_before": now - 300, "not_after": now + 900,
        "network": {
            "interfaces": [{"name": "eth0", "mac": MAC, "addresses": addresses,
                            "gateways": ["10.9.0.1"]}],
            "dns": ["10.9.0.53"], "search": ["dr.example"], "gateway_timeout": 1,
        },
    }  # fmt: skip
    payload.update(over)
    return payload


def script_change(run: str, required: bool = True) -> Dict[str, Any]:
    now = time.time()
    return {
        "v": 1, "type": "script", "run": run, "plan": "p", "kind": "failover", "vm": VM,
        "issued_at": now, "not_before": now - 300, "not_after": now + 900,
        "script": {"which": "production", "timeout": 5, "required": required,
                   "env": {"GUESTBUS_DR_ADDRESSES": "10.9.0.5/16"}},
    }  # fmt: skip


def make_agent(tmp: Path, keys: Keys, backend: Optional[Simulated] = None) -> DrAgent:
    net = backend or Simulated([{"name": "eth0", "mac": MAC, "addresses": ["10.0.0.5/16"]}])
    return DrAgent(VM, tmp / "state", DrOptions(key_path=keys.path, root=tmp / "root", backend=net))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def refused(agent: DrAgent, params: Dict[str, Any]) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        run(agent.dr_apply(params))
    return err.value


# --- verification ---------------------------------------------------------------------------


def test_unsigned_mis_signed_stale_and_foreign_changes_are_refused(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    agent = make_agent(tmp_path, keys)
    change = keys.sign(network("r1", ["10.9.0.5/16"]))
    err = refused(agent, {"payload": change["payload"]})
    assert err.code == "bad_signature" and "unsigned" in err.message
    err = refused(agent, keys.sign(network("r1", ["10.9.0.5/16"]), Ed25519PrivateKey.generate()))
    assert err.code == "bad_signature" and "does not verify" in err.message
    err = refused(agent, dict(change, payload=change["payload"].replace("10.9.0.5", "10.9.0.6")))
    assert err.code == "bad_signature"
    err = refused(agent, keys.sign(network("r1", ["10.9.0.5/16"], issued=time.time() - 3600)))
    assert err.code == "stale" and "expired" in err.message
    err = refused(agent, keys.sign(network("r1", ["10.9.0.5/16"], issued=time.time() + 3600)))
    assert err.code == "stale" and "not valid yet" in err.message
    err = refused(
        agent, keys.sign(network("r1", ["10.9.0.5/16"], vm="0c4b0000-1111-4222-8333-944455556666"))
    )
    assert err.code == "identity_mismatch"
    keys.path.unlink()
    err = refused(agent, change)
    assert err.code == "bad_signature" and "no DR verify key" in err.message
    assert agent.applied == 0
    assert agent.interfaces()[0]["addresses"] == ["10.0.0.5/16"]


# --- apply once ------------------------------------------------------------------------------


def test_a_repeat_is_acknowledged_without_applying_even_after_a_restart(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    agent = make_agent(tmp_path, keys)
    first = run(agent.dr_apply(keys.sign(network("r1", ["10.9.0.5/16"]))))
    assert first["outcome"] == "applied" and "repeat" not in first
    assert agent.interfaces()[0]["addresses"] == ["10.9.0.5/16"]
    assert "nameserver 10.9.0.53" in (tmp_path / "root/etc/resolv.conf").read_text()
    again = run(agent.dr_apply(keys.sign(network("r1", ["10.9.0.5/16"]))))
    assert again["repeat"] is True and agent.applied == 1

    restarted = make_agent(tmp_path, keys)  # a new agent process: memory from dr.json
    assert restarted.backend is not agent.backend
    third = run(restarted.dr_apply(keys.sign(network("r1", ["10.9.0.5/16"]))))
    assert third["repeat"] is True and third["outcome"] == "applied"
    assert restarted.applied == 0  # nothing was applied again

    old = keys.sign(network("r0", ["10.8.0.5/16"], issued=time.time() - 60))
    err = refused(restarted, old)
    assert err.code == "stale" and "older than the change of run r1" in err.message
    newer = run(restarted.dr_apply(keys.sign(network("r2", ["10.7.0.5/16"]))))
    assert newer["outcome"] == "applied" and restarted.applied == 1


def test_concurrent_repeats_wait_for_the_one_apply(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    net = Simulated([{"name": "eth0", "mac": MAC, "addresses": ["10.0.0.5/16"]}], apply_delay=0.3)
    agent = make_agent(tmp_path, keys, net)

    async def both() -> List[Dict[str, Any]]:
        change = keys.sign(network("r1", ["10.9.0.5/16"]))
        return list(await asyncio.gather(agent.dr_apply(change), agent.dr_apply(change)))

    results = run(both())
    assert [r["outcome"] for r in results] == ["applied", "applied"]
    assert sorted(bool(r.get("repeat")) for r in results) == [False, True]
    assert agent.applied == 1 and net.changes == 1


def test_an_unreachable_gateway_rolls_back(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    net = Simulated([{"name": "eth0", "mac": MAC, "addresses": ["10.0.0.5/16"]}])
    net.set_routes("eth0", 4, "10.0.0.1", [])
    net.reachable = set()
    agent = make_agent(tmp_path, keys, net)
    result = run(agent.dr_apply(keys.sign(network("r1", ["10.9.0.5/16"]))))
    assert result["outcome"] == "rolled_back"
    assert "gateway 10.9.0.1 not reachable through eth0 within 1 s" in result["reason"]
    assert net.interfaces()[0]["addresses"] == ["10.0.0.5/16"]
    assert net.nics["eth0"]["routes"] == [{"to": "default", "via": "10.0.0.1", "family": 4}]
    assert not (tmp_path / "root/etc/resolv.conf").exists()
    # remembered too: the same run is not tried again
    again = run(agent.dr_apply(keys.sign(network("r1", ["10.9.0.5/16"]))))
    assert again["outcome"] == "rolled_back" and again["repeat"] is True


def test_an_interface_that_is_not_there_fails_cleanly(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    agent = make_agent(tmp_path, keys)
    payload = network("r1", ["10.9.0.5/16"])
    payload["network"]["interfaces"][0].update(name="eth7", mac="52:54:00:00:00:07")
    result = run(agent.dr_apply(keys.sign(payload)))
    assert result["outcome"] == "failed"
    assert "no interface with MAC 52:54:00:00:00:07 or name eth7" in result["reason"]


def test_interrupted_work_network_is_completed_script_is_not_rerun(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "dr.json").write_text(
        json.dumps(
            {
                "network": {"run": "r1", "state": "started"},
                "script": {"run": "r1", "state": "started"},
            }
        )
    )
    agent = make_agent(tmp_path, keys)
    done = run(agent.dr_apply(keys.sign(network("r1", ["10.9.0.5/16"]))))
    assert done["outcome"] == "applied" and "interrupted" in done["warnings"][-1]
    marker = tmp_path / "ran"
    script = tmp_path / "root/usr/local/sbin/production_vm_recovery"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(str(script), 0o700)
    result = run(agent.dr_script(keys.sign(script_change("r1"))))
    assert result["outcome"] == "interrupted" and not marker.exists()


# --- the recovery script ----------------------------------------------------------------------


def write_script(tmp: Path, body: str, mode: int = 0o700) -> Path:
    path = tmp / "root/usr/local/sbin/production_vm_recovery"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(str(path), mode)
    return path


def test_script_gets_the_addresses_and_its_exit_code_and_tail_are_reported(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    write_script(
        tmp_path,
        'head -c 10000 /dev/zero | tr "\\0" x\necho\n'
        'echo "on $GUESTBUS_DR_ADDRESSES run $GUESTBUS_DR_RUN"\nexit 3\n',
    )
    agent = make_agent(tmp_path, keys)
    result = run(agent.dr_script(keys.sign(script_change("r1"))))
    assert result["outcome"] == "failed" and result["exit_code"] == 3
    assert result["tail"].endswith("on 10.9.0.5/16 run r1\n")
    assert len(result["tail"]) == TAIL_BYTES and result["output_bytes"] == 10000 + 1 + 22
    again = run(agent.dr_script(keys.sign(script_change("r1"))))
    assert again["repeat"] is True and agent.scripts_run == 1


def test_script_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    path = write_script(tmp_path, f"echo started\nsleep 30 &\necho $! > {child}\nwait\n")
    started = time.monotonic()
    result = run(run_script(path, {}, 0.5))
    assert result["outcome"] == "timeout" and result["tail"] == "started\n"
    assert time.monotonic() - started < 5
    pid = int(child.read_text())
    time.sleep(0.1)
    assert not running(pid)  # the script's own child went with it


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_scripts_that_are_missing_or_writable_by_others_do_not_run(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    agent = make_agent(tmp_path, keys)
    missing = run(agent.dr_script(keys.sign(script_change("r1"))))
    assert missing["outcome"] == "not_found"
    optional = run(agent.dr_script(keys.sign(script_change("r2", required=False))))
    assert optional["outcome"] == "skipped"
    write_script(tmp_path, "exit 0\n", mode=0o722)
    writable = run(agent.dr_script(keys.sign(script_change("r3"))))
    assert (
        writable["outcome"] == "refused" and "not writable by group or others" in writable["reason"]
    )
    bad_env = script_change("r4")
    bad_env["script"]["env"] = {"LD_PRELOAD": "/tmp/x.so"}
    write_script(tmp_path, "exit 0\n")
    env = run(agent.dr_script(keys.sign(bad_env)))
    assert env["outcome"] == "refused" and "LD_PRELOAD" in env["reason"]


# --- the files a guest boots with --------------------------------------------------------------

NETPLAN = """# from the installer
network:
  version: 2
  ethernets:
    eth0:
      addresses: [10.0.0.5/16]
      routes:
        - to: default
          via: 10.0.0.1
    "ens4":
      match:
        macaddress: "52:54:00:12:34:56"
      dhcp4: true
    eth1:
      dhcp4: true
"""


def persist(**over: Any) -> Persist:
    data: Dict[str, Any] = {
        "name": "eth0", "mac": MAC, "addresses": ["10.9.0.5/16"], "versions": {4},
        "gateways": ["10.9.0.1"], "routes": [Route("172.16.0.0/12", "10.9.0.254", 4)],
        "dns": ["10.9.0.53"], "search": ["dr.example"],
    }  # fmt: skip
    data.update(over)
    return Persist(**data)


def test_netplan_stanzas_of_the_interface_are_removed_by_name_and_by_mac() -> None:
    text, removed = netplan_remove(NETPLAN, "eth0", MAC)
    assert removed
    assert "eth0" not in text and "ens4" not in text and "macaddress" not in text
    assert "    eth1:\n      dhcp4: true\n" in text and text.startswith("# from the installer")
    only, removed = netplan_remove(
        "network:\n  ethernets:\n    eth0:\n      dhcp4: true\n", "eth0", None
    )
    assert removed and only == "network:\n  ethernets: {}\n"
    untouched, removed = netplan_remove(NETPLAN, "eth9", "52:54:00:00:00:09")
    assert not removed and untouched == NETPLAN
    with pytest.raises(NetError, match="flow style"):
        netplan_remove("network:\n  ethernets: {eth0: {dhcp4: true}}\n", "eth0", None)


def test_rendered_netplan_has_addresses_routes_and_dns() -> None:
    text = render_netplan(persist(), "note")
    assert 'macaddress: "52:54:00:12:34:56"' in text and "dhcp4: false" in text
    assert '- "10.9.0.5/16"' in text
    assert '- to: "0.0.0.0/0"\n          via: "10.9.0.1"' in text
    assert '- to: "172.16.0.0/12"\n          via: "10.9.0.254"' in text
    assert 'addresses: ["10.9.0.53"]' in text and 'search: ["dr.example"]' in text


def test_ifupdown_stanza_is_replaced_in_place() -> None:
    before = (
        "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n"
        "    address 10.0.0.5/16\n    gateway 10.0.0.1\n\niface eth0 inet6 auto\n"
    )
    text, found = ifupdown_replace(before, persist())
    assert found
    assert "iface eth0 inet static\n    address 10.9.0.5/16\n    gateway 10.9.0.1\n" in text
    assert "up ip -4 route replace 172.16.0.0/12 via 10.9.0.254 dev eth0" in text
    assert "dns-nameservers 10.9.0.53" in text and "10.0.0.5" not in text
    assert "iface eth0 inet6 auto" in text and "iface lo inet loopback" in text


def test_networkmanager_profile_is_edited_or_created() -> None:
    existing = (
        "[connection]\nid=Wired\nuuid=7f3c0a56-0000-4000-8000-000000000001\ntype=ethernet\n"
        "interface-name=eth0\n\n[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\naddr-gen-mode=stable-privacy\n"
    )
    text = render_nm(persist(), existing, "note")
    assert "uuid=7f3c0a56-0000-4000-8000-000000000001" in text
    assert "[ipv4]\nmethod=manual\naddress1=10.9.0.5/16\ngateway=10.9.0.1\n" in text
    assert "route1=172.16.0.0/12,10.9.0.254" in text and "dns=10.9.0.53;" in text
    assert "addr-gen-mode=stable-privacy" in text  # the family not changed is kept
    assert "autoconnect-priority=999" in text
    fresh = render_nm(persist(), None, "note")
    assert (
        "interface-name=eth0" in fresh
        and "mac-address=52:54:00:12:34:56".upper()[:11] in fresh.upper()
    )


def test_the_stack_is_chosen_from_what_the_guest_uses(tmp_path: Path) -> None:
    stacks = Stacks(tmp_path)
    assert stacks.choose("eth0") is None
    (tmp_path / "etc/NetworkManager").mkdir(parents=True)
    assert stacks.choose("eth0") == "networkmanager"
    (tmp_path / "etc/network").mkdir()
    (tmp_path / "etc/network/interfaces").write_text("iface eth0 inet dhcp\n")
    assert stacks.choose("eth0") == "ifupdown"  # it defines the interface
    assert stacks.choose("eth1") == "networkmanager"
    (tmp_path / "etc/netplan").mkdir()
    (tmp_path / "etc/netplan/01.yaml").write_text(NETPLAN)
    assert stacks.choose("eth0") == "netplan"
    written, warnings = stacks.persist(persist(), "note")
    assert warnings == []
    assert any(w.endswith("01.yaml (eth0 removed)") for w in written)
    assert (tmp_path / "etc/netplan/01.yaml.guestbus-dr-bak").read_text() == NETPLAN
    assert (tmp_path / "etc/netplan/90-guestbus-dr-eth0.yaml").stat().st_mode & 0o777 == 0o600


def test_resolv_conf_keeps_options() -> None:
    text = render_resolv_conf(
        "nameserver 10.0.0.53\nsearch old.example\noptions edns0\n",
        ["10.9.0.53"],
        ["dr.example"],
        "n",
    )
    assert text == "# n\nsearch dr.example\nnameserver 10.9.0.53\noptions edns0\n"
