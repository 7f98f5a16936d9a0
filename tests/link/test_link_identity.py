"""A VM is who its socket says it is: a payload claiming another VM is refused with
``identity_mismatch``, counted, and changes nothing about the VM it claims to be."""

from __future__ import annotations

import asyncio

import pytest

from guestbus.contract import LinkKind, VmRecord

from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, HandGuest, LinkStack, StackFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> LinkStack:
    return await make_stack(bridge_mode="inprocess", heartbeat=0.5, down_grace=60.0)


async def quiet_record(stack: LinkStack, vm: str, quiet: float = 1.5) -> tuple[VmRecord, int]:
    """The VM's entry once it has not changed for ``quiet`` seconds: (record, revision)."""
    loop = asyncio.get_running_loop()
    last: tuple[VmRecord | None, int | None] = (None, None)
    since = loop.time()

    async def settled() -> bool:
        nonlocal last, since
        now = await stack.registry.get(vm)
        if now[1] != last[1]:
            last, since = now, loop.time()
        return loop.time() - since >= quiet

    await wait_until(settled, 15, f"VM {vm}'s registry entry to stop changing", 0.1)
    rec, rev = last
    assert rec is not None and rev is not None
    return rec, rev


async def test_payload_claiming_another_vm_is_refused_counted_and_changes_nothing(
    stack: LinkStack,
) -> None:
    victim = (await stack.fleet.add_vm()).uuid
    bystander = (await stack.fleet.add_vm()).uuid
    await stack.wait_active([victim, bystander])
    await stack.wait_registered([victim, bystander])
    # The victim's agent stops, so from now on nobody has any business changing its entry.
    await stack.fleet.stop_agent(victim)
    victim_rec, victim_rev = await quiet_record(stack, victim)
    bystander_before = (await stack.records())[bystander]

    liar_vm = await stack.fleet.add_vm(agent=False)
    liar = liar_vm.uuid
    await asyncio.wait_for(liar_vm.client_connected.wait(), 10)
    guest = await HandGuest.open(liar_vm)
    refused_hb = stack.router_metric("guestbus_identity_refusals_total", method="heartbeat")
    refused_rp = stack.router_metric("guestbus_identity_refusals_total", method="report")
    mark = stack.events.mark()
    try:
        # hello claiming the victim (what a clone does): the host stamps the socket's identity
        hello = await guest.hello({"vm": victim, "hostname": "evil"})
        assert hello.ok and hello.result is not None, hello
        assert hello.result["vm"] == liar
        assert hello.result["identity_matches"] is False
        assert hello.result["host"] == BRIDGE_HOST

        # heartbeat and report claiming the victim: refused, whatever the spelling
        for claim in (victim, victim.upper()):
            beat = await guest.request("heartbeat", {"seq": 1, "vm": claim, "config_uuid": "x"})
            assert beat.code == "identity_mismatch", beat
            assert liar in beat.message and claim.lower() in beat.message
        report = await guest.request(
            "report",
            {
                "vm": victim,
                "hostname": "evil",
                "os": "EvilOS",
                "kernel": "6.6.6",
                "agent_version": "6.6.6",
                "uptime": 1.0,
            },
        )
        assert report.code == "identity_mismatch", report

        # counted by rpc-router, and announced on the liar's own event subject
        assert (
            stack.router_metric("guestbus_identity_refusals_total", method="heartbeat")
            == refused_hb + 2
        )
        assert (
            stack.router_metric("guestbus_identity_refusals_total", method="report")
            == refused_rp + 1
        )
        await wait_until(
            lambda: (
                len([e for e in stack.events.vm_events(liar, mark) if e.kind == "identity_refused"])
                == 3
            ),
            5,
            "three identity_refused events for the liar",
        )
        assert not stack.events.vm_events(victim, mark)

        # claiming itself (or nothing) is fine
        assert (await guest.request("heartbeat", {"seq": 2, "vm": liar})).ok
        assert (await guest.request("heartbeat", {"seq": 3})).ok
    finally:
        await guest.close()

    # the victim's entry was not written at all; the bystander kept what it reported
    rec, rev = await stack.registry.get(victim)
    assert rev == victim_rev
    assert rec == victim_rec
    records = await stack.records()
    after = records[bystander]
    for field in ("hostname", "os", "kernel", "agent_version", "config_uuid", "host", "link"):
        assert getattr(after, field) == getattr(bystander_before, field), field
    # the liar got an entry of its own, under the identity of its socket
    own = records[liar]
    assert own.link is LinkKind.SERIAL and own.host == BRIDGE_HOST
    assert own.hostname == "evil"  # from its own hello: its business, under its own uuid
    assert own.os is None and own.kernel is None  # the refused report wrote nothing
    assert all(r.os != "EvilOS" for r in records.values())
