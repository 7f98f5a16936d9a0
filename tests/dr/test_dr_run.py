"""Failover and test runs through the real bus, bridge and agents (simulated guest network)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from guestbus.contract import DrRunState, DrStepState, DrVmState
from guestbus.lab.fleet import LabAgent

from ._support import DrStack, by_vm, expect_error

SCRIPT_OK = """#!/bin/sh
echo "recovering $GUESTBUS_VM on $GUESTBUS_DR_ADDRESSES via $GUESTBUS_DR_GATEWAY \\
($GUESTBUS_DR_KIND)"
exit 0
"""
SCRIPT_SLOW = """#!/bin/sh
echo started
sleep 30
echo never
"""


def install_script(agent: LabAgent, name: str, text: str) -> Path:
    assert agent.agent is not None
    path = agent.agent.dr.options.root / "usr/local/sbin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o700)
    return path


def network(agent: LabAgent) -> list[str]:
    """The addresses of the lab VM's (simulated) eth0."""
    assert agent.network is not None
    return list(agent.network.interfaces()[0]["addresses"])


def plan(name: str, groups: list[list[str]], **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "mappings": [
            {"source": "10.0.0.0/16", "target": "10.9.0.0/16", "gateway": "10.9.0.1",
             "dns": ["10.9.0.53"], "search": ["dr.example"]},
        ],
        "test_mappings": [
            {"source": "10.0.0.0/16", "target": "192.168.0.0/16", "gateway": "192.168.0.1"},
        ],
        "groups": groups,
        "timeouts": {"link": 20, "apply": 10, "script": 5, "gateway": 2},
        **extra,
    }  # fmt: skip


async def test_plan_is_validated_stored_and_versioned(stack: DrStack) -> None:
    bad = plan("bad", [["a", "a"]])
    bad["mappings"] = [
        {"source": "10.0.0.0/16", "target": "10.9.0.0/24"},
        {"source": "10.0.1.0/24", "target": "10.8.0.0/24"},
        {"source": "10.1.0.5/24", "target": "fd00::/64", "gateway": "10.9.0.1"},
    ]
    with expect_error("invalid_plan") as err:
        await stack.call("plan.put", {"plan": bad})
    problems = err.value.details["problems"]
    assert any("mappings[1].source 10.0.1.0/24 lies inside mappings[0]" in p for p in problems)
    assert any("has host bits set; did you mean 10.1.0.0/24" in p for p in problems)
    assert any("groups[0][1]: VM 'a' is already in groups[0]" in p for p in problems)
    with expect_error("invalid_plan") as err:
        broken = {"name": "x", "groups": [["a"]], "timeouts": {"link": "soon"}}
        await stack.call("plan.put", {"plan": broken})
    assert "timeouts.link" in err.value.message

    first = await stack.call("plan.put", {"plan": plan("stored", [["vm-1"]])})
    assert first["created"] is True and first["revision"] > 0
    assert any("not in the VM registry yet: vm-1" in w for w in first["warnings"])
    shown = await stack.call("plan.get", {"name": "stored"})
    assert shown["plan"]["mappings"][0]["target"] == "10.9.0.0/16"
    with expect_error("conflict"):
        stale = first["revision"] + 99
        await stack.call(
            "plan.put", {"plan": plan("stored", [["vm-2"]]), "expected_revision": stale}
        )
    second = await stack.call(
        "plan.put", {"plan": plan("stored", [["vm-2"]]), "expected_revision": first["revision"]}
    )
    assert second["created"] is False and second["revision"] > first["revision"]
    listed = await stack.call("plan.list", {})
    assert [p["name"] for p in listed["plans"]] == ["stored"]
    with expect_error("not_found"):
        await stack.call("run.start", {"plan": "nope"})


async def test_failover_in_group_order_with_overrides_scripts_and_a_missing_link(
    stack: DrStack,
) -> None:
    vms = await stack.fleet.add_vms(4)
    a, b, c, d = (vm.uuid for vm in vms)
    ghost = str(uuid.uuid4())  # in the plan, but no VM and no agent: its link never comes up
    await stack.link.wait_registered([a, b, c, d])
    agents = stack.fleet.agents
    install_script(agents[a], "production_vm_recovery", SCRIPT_OK)
    install_script(agents[b], "production_vm_recovery", SCRIPT_SLOW)
    before = {vm: network(agents[vm]) for vm in (a, b, c, d)}
    spec = plan(
        "site-b",
        [[a, b, ghost], [c, d]],
        script=True,
        vms=[
            {"vm": c, "addresses": ["10.9.200.7/16"], "script": False},
            {"vm": d, "script": False},
            {"vm": ghost, "script": False},
        ],
    )
    spec["timeouts"] = {"link": 1.5, "apply": 10, "script": 1, "gateway": 2}
    await stack.call("plan.put", {"plan": spec})
    run = (await stack.call("run.start", {"plan": "site-b", "run": "site-b-1"}))["id"]
    reply = await stack.wait_run(run)
    vm = by_vm(reply)
    assert reply.run.state is DrRunState.FAILED

    # a: mapped (offset kept), script ran with the new addresses in its environment
    old_a = before[a][0].split("/")[0]
    new_a = "10.9." + ".".join(old_a.split(".")[2:])
    va, vb, vc, vd, vg = vm[a], vm[b], vm[c], vm[d], vm[ghost]
    assert va.state is DrVmState.SCRIPT_OK and va.finished
    assert network(agents[a]) == [f"{new_a}/16"]
    assert va.script is not None and va.script.exit_code == 0
    assert f"on {new_a}/16 via 10.9.0.1 (failover)" in va.script.tail
    assert va.target is not None and va.target.dns == ["10.9.0.53"]
    agent_a = agents[a].agent
    assert agent_a is not None
    resolv = (agent_a.dr.options.root / "etc/resolv.conf").read_text()
    assert "nameserver 10.9.0.53" in resolv and "search dr.example" in resolv
    # b: applied, then its script timed out: reported with its output tail
    assert vb.state is DrVmState.FAILED
    assert vb.reason == "script timed out after 1 s"
    assert vb.steps["network"].state is DrStepState.OK
    assert vb.script is not None and vb.script.tail == "started\n"
    # the ghost: never linked
    assert vg.state is DrVmState.FAILED
    assert vg.reason is not None and vg.reason.startswith("link not up within 1.5 s")
    assert vg.steps["link"].state is DrStepState.FAILED
    # c: custom address over the rules, gateway and DNS from the rule whose target covers it
    assert network(agents[c]) == ["10.9.200.7/16"]
    assert vc.target is not None and vc.target.interfaces[0].gateways == ["10.9.0.1"]
    assert vc.state is DrVmState.APPLIED and vc.steps["script"].state is DrStepState.SKIPPED
    assert vd.state is DrVmState.APPLIED and vd.finished
    # group order: group 1 started after every VM of group 0 had finished
    ends = [x.finished_at for x in (va, vb, vg)]
    starts = [x.started_at for x in (vc, vd)]
    assert all(e is not None for e in ends) and all(s is not None for s in starts)
    assert min(s for s in starts if s) >= max(e for e in ends if e)
    # a failed VM in group 0 did not stop group 1 (the plan does not stop on failure)
    assert reply.run.counts == {"script-ok": 1, "failed": 2, "applied": 2}

    # the report's run list and a VM already in a running run
    runs = await stack.call("run.list", {"plan": "site-b"})
    assert runs["runs"][0]["id"] == run and runs["runs"][0]["state"] == "failed"


async def test_test_run_uses_test_mappings_and_the_test_script(stack: DrStack) -> None:
    (vm,) = await stack.fleet.add_vms(1)
    await stack.link.wait_registered([vm.uuid])
    agent = stack.fleet.agents[vm.uuid]
    install_script(agent, "test_vm_recovery", SCRIPT_OK)
    await stack.call("plan.put", {"plan": plan("bubble", [[vm.uuid]], script="optional")})
    run = (await stack.call("run.start", {"plan": "bubble", "kind": "test"}))["id"]
    reply = await stack.wait_run(run)
    status = by_vm(reply)[vm.uuid]
    assert reply.run.state is DrRunState.SUCCEEDED, status.reason
    assert network(agent)[0].startswith("192.168.")
    assert status.script is not None and "(test)" in status.script.tail


async def test_an_override_for_no_vm_of_the_groups_is_refused_when_the_run_starts(
    stack: DrStack,
) -> None:
    """Groups by name, override by uuid: only the registry can tell they disagree."""
    (vm,) = await stack.fleet.add_vms(1)
    await stack.link.wait_registered([vm.uuid])
    name = "orphan-web"  # as a bridge records it from the domain XML
    await stack.link.registry.change(vm.uuid, lambda r: r.model_copy(update={"name": name}))
    stranger = str(uuid.uuid4())
    override = {"vm": stranger, "addresses": ["10.9.0.201/16"]}
    put = await stack.call("plan.put", {"plan": plan("orphan", [[name]], vms=[override])})
    assert put["created"] is True  # undecidable when stored
    with expect_error("invalid_plan") as err:
        await stack.call("run.start", {"plan": "orphan"})
    assert f"VM {stranger!r} has overrides but is in no group" in err.value.message
