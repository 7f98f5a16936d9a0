"""What must hold when things go wrong: refused changes, a killed orchestrator, two replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guestbus.contract import (
    KV_DR_KEYS,
    KV_DR_RUNS,
    KV_LEASES,
    DrInterfaceTarget,
    DrNetworkChange,
    DrRun,
    DrRunKind,
    DrRunState,
    DrVmState,
)
from guestbus.dr.signing import Signer, load_private
from guestbus.lab.fleet import LabAgent
from guestbus_dr_orchestrator.service import DrOrchestrator

from ..link._support import command
from ..support.waiting import wait_until
from ._support import DrStack, by_vm


@pytest.fixture(scope="module")
async def bare(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DrStack]:
    """A DR stack without an orchestrator: each test starts its own."""
    dr = DrStack(tmp_path_factory.mktemp("dr-bare"))
    try:
        await dr.start()
        yield dr
    finally:
        await dr.close()


def applied(agent: LabAgent) -> int:
    assert agent.agent is not None
    return agent.agent.dr.applied


def plan(name: str, groups: list[list[str]]) -> dict[str, object]:
    return {
        "name": name,
        "mappings": [{"source": "10.0.0.0/16", "target": "10.7.0.0/16", "gateway": "10.7.0.1"}],
        "groups": groups,
        "timeouts": {"link": 30, "apply": 10, "gateway": 0},
    }


async def test_unsigned_mis_signed_stale_and_foreign_changes_are_refused(stack: DrStack) -> None:
    (vm,) = await stack.fleet.add_vms(1)
    await stack.link.wait_registered([vm.uuid])
    agent = stack.fleet.agents[vm.uuid]
    assert agent.network is not None
    before = agent.network.interfaces()
    keys = await stack.link.bus.jetstream().key_value(KV_DR_KEYS)
    signer = Signer(load_private((await keys.get("signing.private")).value or b""))
    change = DrNetworkChange(
        interfaces=[DrInterfaceTarget(name="eth0", addresses=["10.7.9.9/16"])],
        gateway_timeout=0,
    )

    def signed(s: Signer, vm_id: str, run: str, now: float | None = None) -> dict[str, object]:
        payload = s.payload(
            run=run, plan="p", kind=DrRunKind.FAILOVER, vm=vm_id, network=change, now=now
        )
        return s.sign(payload).model_dump(exclude_none=True)

    good = signed(signer, vm.uuid, "r-2")
    unsigned = {"payload": good["payload"]}
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", unsigned)
    assert reply.code == "bad_signature" and reply.error is not None
    assert "unsigned" in reply.error.message

    intruder = Signer(Ed25519PrivateKey.generate())
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", signed(intruder, vm.uuid, "r-2"))
    assert reply.code == "bad_signature" and reply.error is not None
    assert f"names key {intruder.key_id}" in reply.error.message

    tampered = dict(good, payload=str(good["payload"]).replace("10.7.9.9", "10.7.9.8"))
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", tampered)
    assert reply.code == "bad_signature"

    old = signed(signer, vm.uuid, "r-2", now=time.time() - 3600)
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", old)
    assert reply.code == "stale" and reply.error is not None
    assert "expired" in reply.error.message

    other = signed(signer, "5b0c1e2a-1111-4222-8333-944455556666", "r-2")
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", other)
    assert reply.code == "identity_mismatch"
    assert agent.network.interfaces() == before and applied(agent) == 0

    # a correct change applies; the same run again is acknowledged, not redone
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", good, deadline_ms=5000)
    assert reply.ok()["outcome"] == "applied" and reply.ok().get("repeat") is None
    again = await command(stack.link.bus, vm.uuid, "dr_apply", signed(signer, vm.uuid, "r-2"))
    assert again.ok()["repeat"] is True and applied(agent) == 1
    # a replay of an older run's (validly signed, unexpired) change is stale
    replay = signed(signer, vm.uuid, "r-1", now=time.time() - 120)
    reply = await command(stack.link.bus, vm.uuid, "dr_apply", replay)
    assert reply.code == "stale" and reply.error is not None
    assert "older than the change of run r-2" in reply.error.message
    assert agent.network.interfaces()[0]["addresses"] == ["10.7.9.9/16"] and applied(agent) == 1


async def test_a_killed_orchestrator_resumes_without_double_apply(
    bare: DrStack, tmp_path: Path
) -> None:
    a, b = await bare.fleet.add_vms(2)
    c = await bare.fleet.add_vm(agent=False)  # its agent starts only after the crash
    await bare.link.wait_registered([a.uuid, b.uuid])
    agents = bare.fleet.agents
    slow = agents[a.uuid].network
    assert slow is not None
    slow.apply_delay = 1.0  # the crash lands while a's change is being applied
    log = tmp_path / "orchestrator.log"
    first = bare.orchestrator_process("dr-p", log)
    await bare.wait_process_ready(first, log)
    await bare.call("plan.put", {"plan": plan("resume", [[a.uuid, b.uuid], [c.uuid]])})
    await bare.call("run.start", {"plan": "resume", "run": "resume-1"})
    await bare.wait_vm("resume-1", a.uuid, {"applying"})
    first.kill()
    first.wait(10)
    # the agent finishes applying on its own; the orchestrator never heard the answer
    await wait_until(lambda: applied(agents[a.uuid]) == 1, 10, "a's agent to finish applying")
    runs = await bare.link.bus.jetstream().key_value(KV_DR_RUNS)
    record = DrRun.model_validate_json((await runs.get("run.resume-1")).value or b"")
    assert record.state is DrRunState.RUNNING  # nobody drives it now

    await bare.fleet.start_agent(c)
    second = bare.orchestrator_process("dr-p", log)  # same instance name: takes its lease back
    await bare.wait_process_ready(second, log)
    reply = await bare.wait_run("resume-1", timeout=30)
    vm = by_vm(reply)
    assert reply.run.state is DrRunState.SUCCEEDED, log.read_text()[-3000:]
    assert reply.run.resumed == 1
    assert vm[a.uuid].state is DrVmState.APPLIED and vm[a.uuid].repeat is True
    for x in (a, b, c):
        assert applied(agents[x.uuid]) == 1, f"{x.uuid} applied {applied(agents[x.uuid])} times"
        assert vm[x.uuid].finished
    assert slow.interfaces()[0]["addresses"][0].startswith("10.7.")
    second.terminate()
    second.wait(10)


async def test_two_replicas_never_drive_one_run(bare: DrStack) -> None:
    x = await bare.orchestrator("dr-x")
    y = await bare.orchestrator("dr-y")
    one = await bare.fleet.add_vm()
    two = await bare.fleet.add_vm(agent=False)
    await bare.link.wait_registered([one.uuid])
    await bare.call("plan.put", {"plan": plan("pair", [[one.uuid], [two.uuid]])})
    await bare.call("run.start", {"plan": "pair", "run": "pair-1"})
    await bare.wait_vm("pair-1", two.uuid, {"waiting-for-link"})

    def drivers() -> list[str]:
        out = []
        for host in (x, y):
            svc = host.service
            assert isinstance(svc, DrOrchestrator)
            if host.ready and "pair-1" in svc.drivers:
                out.append(svc.settings.dr_instance)
        return out

    for _ in range(10):  # both replicas scan every 0.3 s: only the lease holder drives
        assert len(drivers()) == 1, drivers()
        await asyncio.sleep(0.1)
    (owner,) = drivers()
    leases = await bare.link.bus.jetstream().key_value(KV_LEASES)
    holder = (await leases.get("dr-run.pair-1")).value or b""
    assert f'"owner": "{owner}"'.encode() in holder

    leaving, staying = (x, y) if owner == "dr-x" else (y, x)
    await leaving.stop()  # a graceful stop hands the lease back at once
    await wait_until(lambda: drivers() == [staying.settings.dr_instance], 5, "the other replica")  # type: ignore[attr-defined]
    await bare.fleet.start_agent(two)
    reply = await bare.wait_run("pair-1")
    assert reply.run.state is DrRunState.SUCCEEDED
    assert reply.run.driver == staying.settings.dr_instance  # type: ignore[attr-defined]
    assert reply.run.resumed == 1
    assert applied(bare.fleet.agents[one.uuid]) == 1
    assert applied(bare.fleet.agents[two.uuid]) == 1
