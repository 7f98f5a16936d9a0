"""Links over a VM's life: restart (socket gone and back), link events, removal, and a VM
whose heartbeats stop being marked down after the grace period."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.msg import Msg

from guestbus.contract import CA_ISSUE, CA_QUEUE, LinkKind, LinkState, ca_subject
from guestbus.runtime import BusError

from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, LinkStack, StackFactory, command

pytestmark = pytest.mark.timeout(60)

GRACE = 3.0


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> LinkStack:
    return await make_stack(
        bridge_mode="inprocess", heartbeat=0.5, down_grace=GRACE, sweep_interval=0.25
    )


@pytest.mark.parametrize(
    "downtime",
    [0.1, 1.5],
    ids=["short-downtime", "socket-gone-across-scans"],
)
async def test_vm_restart_link_goes_down_then_up_with_the_same_identity(
    stack: LinkStack, downtime: float
) -> None:
    vm = await stack.fleet.add_vm()
    uuid = vm.uuid
    await stack.wait_active([uuid])
    await stack.wait_registered([uuid])
    status = stack.agent_link(uuid).status
    hellos = status.hellos
    mark = stack.events.mark()
    restarted_at = datetime.now(UTC)
    bridge = stack.bridge_inproc
    assert bridge is not None
    link_before = bridge.service.links[uuid]

    await stack.fleet.hypervisor.restart_vm(uuid, downtime=downtime)
    assert vm.generation == 1 and vm.socket_path.exists()

    def down_then_up() -> bool:
        states = [e.state for e in stack.events.link_events(uuid, mark)]
        return states == [LinkState.DOWN, LinkState.UP]

    await wait_until(
        down_then_up,
        20,
        "link events down, then up",
        detail=lambda: f"{stack.events.link_events(uuid, mark)}\n{stack.agents_detail()}",
    )
    down, up = stack.events.link_events(uuid, mark)
    for event in (down, up):
        assert event.vm == uuid and event.link is LinkKind.SERIAL and event.host == BRIDGE_HOST
    assert down.reason  # says why

    # the agent reopened its (new) serial device and is active under the same identity
    await stack.wait_active([uuid])
    assert status.hellos > hellos
    assert status.stamped_vm == uuid
    rec = (await stack.wait_registered([uuid]))[uuid]
    assert rec.last_hello is not None and rec.last_hello > restarted_at
    assert rec.host == BRIDGE_HOST
    if downtime > 2 * stack.config.scan_interval:
        # discovery saw the socket vanish and found it again: a new link, same VM
        assert bridge.service.links[uuid] is not link_before
    pong = await command(stack.bus, uuid, "ping")
    assert pong.ok()["pong"] is True
    info = await command(stack.bus, uuid, "info")
    assert info.ok()["vm"] == uuid
    await stack.fleet.hypervisor.remove_vm(uuid)


async def test_vm_restart_while_a_guest_rpc_is_in_flight_the_agent_carries_on(
    stack: LinkStack,
) -> None:
    """The link closes under a request the guest is waiting on (its enrollment, which a busy
    cert-authority has not answered yet): the agent must carry on, not die of it."""
    asked: list[str] = []
    held: list[Msg] = []

    async def busy_ca(msg: Msg) -> None:
        asked.append(str(json.loads(msg.data).get("vm")))
        held.append(msg)  # not answered until the end of the test

    sub = await stack.bus.subscribe(ca_subject(CA_ISSUE), queue=CA_QUEUE, cb=busy_ca)
    await stack.bus.flush()
    try:
        vm = await stack.fleet.add_vm()
        uuid = vm.uuid
        await wait_until(lambda: uuid in asked, 20, "the agent's enrollment at the CA")
        mark = stack.events.mark()
        await stack.fleet.hypervisor.restart_vm(uuid, downtime=0.2)
        await wait_until(
            lambda: (
                [e.state for e in stack.events.link_events(uuid, mark)]
                == [LinkState.DOWN, LinkState.UP]
            ),
            20,
            "link events down, then up",
            detail=stack.agents_detail,
        )
        agent_task = stack.fleet.agents[uuid].task
        assert agent_task is not None and not agent_task.done(), agent_task
        await stack.wait_active([uuid])
        assert (await command(stack.bus, uuid, "ping")).ok()["pong"] is True
        await stack.fleet.hypervisor.remove_vm(uuid)
    finally:
        await sub.unsubscribe()
        busy = BusError("ca_unavailable", "the test's stand-in CA is busy", 503)
        for msg in held:
            if msg.reply:
                await stack.bus.publish(msg.reply, busy.to_bytes(), headers=busy.headers())


async def test_link_events_on_up_and_down_and_the_registry_follows_at_once(
    stack: LinkStack,
) -> None:
    mark = stack.events.mark()
    vm = await stack.fleet.add_vm()
    uuid = vm.uuid
    await wait_until(
        lambda: [e.state for e in stack.events.link_events(uuid, mark)] == [LinkState.UP],
        20,
        "a link-up event",
    )
    up = stack.events.link_events(uuid, mark)[0]
    assert up.vm == uuid and up.link is LinkKind.SERIAL and up.host == BRIDGE_HOST
    await stack.wait_registered([uuid])

    # the VM goes away (socket removed): link down at once, registry follows the event
    removed = time.monotonic()
    await stack.fleet.hypervisor.remove_vm(uuid)
    await wait_until(
        lambda: (
            [e.state for e in stack.events.link_events(uuid, mark)]
            == [LinkState.UP, LinkState.DOWN]
        ),
        10,
        "a link-down event",
    )
    await stack.wait_registered([uuid], timeout=10, link="down")
    took = time.monotonic() - removed
    # not the heartbeat sweep (which waits GRACE seconds and announces itself on gb.evt.vm)
    assert took < GRACE - 0.5, f"registry took {took:.2f}s to show the link down"
    assert not [e for e in stack.events.vm_events(uuid, mark) if e.kind == "down"]


async def test_vm_whose_heartbeats_stop_is_marked_down_after_the_grace(stack: LinkStack) -> None:
    vm = await stack.fleet.add_vm()
    uuid = vm.uuid
    await stack.wait_active([uuid])
    await stack.wait_registered([uuid])
    marked_before = stack.router_metric("guestbus_vms_marked_down_total")
    mark = stack.events.mark()

    # The agent stops; the bridge still holds the socket (a serial line has no carrier),
    # so only the missing heartbeats can tell.
    await stack.fleet.stop_agent(uuid)
    stopped = datetime.now(UTC)

    await wait_until(
        lambda: any(e.kind == "down" for e in stack.events.vm_events(uuid, mark)),
        GRACE + 5,
        f"a 'down' event on gb.evt.vm.{uuid}",
    )
    event = next(e for e in stack.events.vm_events(uuid, mark) if e.kind == "down")
    rec = (await stack.records())[uuid]
    assert rec.link is LinkKind.DOWN
    assert rec.last_heartbeat is not None and rec.last_heartbeat <= stopped
    silent = event.at - rec.last_heartbeat
    assert silent >= timedelta(seconds=GRACE), f"marked down after only {silent}"
    assert silent < timedelta(seconds=GRACE + 3), f"marked down only after {silent}"
    assert event.detail and BRIDGE_HOST in event.detail
    assert stack.router_metric("guestbus_vms_marked_down_total") == marked_before + 1
    assert not stack.events.link_events(uuid, mark)  # the bridge never saw the link drop

    # heartbeats resume (the agent is back): the VM is up again over serial
    await stack.fleet.start_agent(vm)
    await stack.wait_active([uuid])
    await stack.wait_registered([uuid], timeout=10)


async def test_a_discovered_vm_is_listed_before_its_agent_says_hello(stack: LinkStack) -> None:
    """The bridge records VMs it discovers, so an operator (and iso-builder, which builds only
    for known VMs) sees a new VM before any agent runs in it; the router's fields stay unset."""
    vm = await stack.fleet.hypervisor.add_vm()  # a socket, no agent behind it

    async def recorded() -> bool:
        return vm.uuid in await stack.records()

    await wait_until(recorded, 10, "the discovered VM in the registry")
    rec = (await stack.records())[vm.uuid]
    assert rec.link is LinkKind.DOWN
    assert rec.host == BRIDGE_HOST
    assert rec.agent_version is None and rec.last_hello is None and rec.last_heartbeat is None
    await stack.fleet.hypervisor.remove_vm(vm.uuid)
