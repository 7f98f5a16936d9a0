"""A fleet of 20 lab VMs on a serial-bridge process: registration, heartbeats, host commands,
and every way a command can fail (not allow-listed, unknown VM, no agent, silent guest)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
from nats.errors import NoRespondersError

from guestbus.contract import GuestInfo, LinkKind, LinkState, PingResult
from guestbus.wire import FrameDecoder

from ..support.probes import sample
from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, LinkStack, StackFactory, command, random_vm

pytestmark = pytest.mark.timeout(90)

N_VMS = 20


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> LinkStack:
    stack = await make_stack(bridge_mode="process", heartbeat=0.5)
    await stack.fleet.add_vms(N_VMS)
    return stack


@pytest.fixture(scope="module")
def vms(stack: LinkStack) -> list[str]:
    """The 20 VMs with agents, in creation order."""
    return list(stack.fleet.agents)[:N_VMS]


async def test_twenty_vms_come_up_heartbeat_and_register_over_serial(
    stack: LinkStack, vms: list[str]
) -> None:
    assert len(vms) == N_VMS
    await stack.wait_active(vms, timeout=30)
    records = await stack.wait_registered(vms, timeout=20)

    for vm in vms:
        rec = records[vm]
        assert rec.link is LinkKind.SERIAL
        assert rec.host == BRIDGE_HOST
        assert rec.protocol == 1
        assert rec.last_hello is not None and rec.last_heartbeat is not None
        assert "cmd:ping" in rec.capabilities
        # the identity the agent holds is the one the bridge stamped from the socket
        assert stack.agent_link(vm).status.stamped_vm == vm
        # one "up" event per link, from this bridge
        ups = [e for e in stack.events.link_events(vm) if e.state is LinkState.UP]
        assert ups and ups[0].link is LinkKind.SERIAL and ups[0].host == BRIDGE_HOST

    # heartbeats keep arriving: every VM's last_heartbeat moves past the snapshot
    before: dict[str, datetime] = {}
    for vm in vms:
        last = records[vm].last_heartbeat
        assert last is not None
        before[vm] = last
    ok_before = {vm: stack.agent_link(vm).status.heartbeats_ok for vm in vms}

    async def all_advanced() -> bool:
        now = await stack.records()
        return all((hb := now[vm].last_heartbeat) is not None and hb > before[vm] for vm in vms)

    await wait_until(all_advanced, 10, "every VM's last_heartbeat to advance", 0.1)
    assert all(stack.agent_link(vm).status.heartbeats_ok > ok_before[vm] for vm in vms)

    metrics = await stack.bridge.metrics()
    assert sample(metrics, "guestbus_bridge_links", state="discovered") == N_VMS
    assert sample(metrics, "guestbus_bridge_links", state="connected") == N_VMS
    assert sample(metrics, "guestbus_bridge_links", state="up") == N_VMS
    assert sample(metrics, "guestbus_bridge_frames_total", direction="in") > 0


async def test_ping_info_and_allowed_answer_from_the_guest(
    stack: LinkStack, vms: list[str]
) -> None:
    await stack.wait_active(vms)
    for vm in vms[:5]:
        pong = PingResult.model_validate((await command(stack.bus, vm, "ping")).ok())
        assert pong.pong is True and pong.agent_time is not None
        assert abs(pong.agent_time - time.time()) < 5

        info = GuestInfo.model_validate((await command(stack.bus, vm, "info")).ok())
        assert info.vm == vm  # answered by this VM's own agent
        assert info.agent_version and info.kernel

        allowed = (await command(stack.bus, vm, "allowed")).ok()
        assert allowed["commands"] == list(stack.fleet.agents[vm].config.allowed_commands)
        assert {"ping", "info", "allowed"} <= set(allowed["commands"])


async def test_command_not_on_the_allow_list_is_refused_not_allowed(
    stack: LinkStack, vms: list[str]
) -> None:
    await stack.wait_active(vms)
    allow_list = list(stack.fleet.agents[vms[0]].config.allowed_commands)
    assert "reboot" not in allow_list
    reply = await command(stack.bus, vms[0], "reboot", {"force": True})
    assert reply.code == "not_allowed", reply
    assert reply.headers["GB-Error-Code"] == "not_allowed"
    assert reply.headers["Nats-Service-Error-Code"] == "403"
    assert reply.error is not None and reply.error.details == {"allowed": allow_list}


async def test_command_for_a_vm_not_on_this_host_gets_no_responders(stack: LinkStack) -> None:
    started = time.monotonic()
    with pytest.raises(NoRespondersError):
        await command(stack.bus, random_vm(), "ping", deadline_ms=5000, timeout=5)
    assert time.monotonic() - started < 1.0


async def test_vm_without_an_active_link_is_refused_at_once(stack: LinkStack) -> None:
    vm = await stack.fleet.add_vm(agent=False)
    # the bridge discovers the socket and connects to it (no agent says hello yet)
    await asyncio.wait_for(vm.client_connected.wait(), 10)
    await asyncio.sleep(0.5)  # a few discovery scans: still no link

    # Only a terminator whose link is up serves gb.guest.<vm>.*: no responder at all, at
    # once (the CLI reports it as no_active_link), rather than a wait for the deadline.
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoRespondersError):
        await stack.bus.request(f"gb.guest.{vm.uuid}.ping", b"{}", timeout=5)
    assert loop.time() - started < 0.5

    # Once the agent says hello, the same subject is served.
    await stack.fleet.start_agent(vm)
    await stack.wait_active([vm.uuid])
    assert (await command(stack.bus, vm.uuid, "ping")).ok()["pong"] is True


async def test_silent_guest_gets_a_typed_timeout_at_the_deadline(stack: LinkStack) -> None:
    vm = await stack.fleet.add_vm()
    await stack.wait_active([vm.uuid])
    await stack.wait_registered([vm.uuid])
    assert (await command(stack.bus, vm.uuid, "ping")).ok()["pong"] is True

    # The agent stops; the guest keeps its serial port open and reads but never answers.
    # A serial line has no carrier, so the bridge still holds a ready link.
    await stack.fleet.stop_agent(vm.uuid)
    reader, writer = await vm.open_guest()
    heard = FrameDecoder()
    requests: list[dict[str, object]] = []

    async def listen() -> None:
        while data := await reader.read(65536):
            requests.extend(f for f in heard.feed(data) if isinstance(f, dict))

    listener = asyncio.ensure_future(listen())
    try:
        reply = await command(stack.bus, vm.uuid, "ping", deadline_ms=1000, timeout=10)
        assert reply.code == "timeout", reply
        assert reply.headers["Nats-Service-Error-Code"] == "504"
        assert 0.9 <= reply.elapsed < 2.0, f"timeout came after {reply.elapsed:.3f}s, not ~1s"
        # it did reach the guest, with the caller's deadline
        await wait_until(
            lambda: any(r.get("method") == "ping" for r in requests), 5, "the ping in the guest"
        )
        ping = next(r for r in requests if r.get("method") == "ping")
        assert ping["kind"] == "req" and ping["deadline_ms"] == 1000
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        writer.close()
