"""Self-service restore requests from a guest reach the host adapter of the VM the socket
belongs to (``gb.hv.<stamped vm>.<op>``), whatever the payload claims; with no adapter for
the VM the guest gets a typed error at once."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.msg import Msg

from guestbus.contract import HEADER_LINK, HEADER_VM, SSR_FORWARD

from ._support import HandGuest, LinkStack, StackFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> LinkStack:
    return await make_stack(bridge_mode="inprocess", heartbeat=0.5, down_grace=60.0)


async def test_ssr_requests_go_to_the_stamped_vms_adapter_only(stack: LinkStack) -> None:
    me_vm = await stack.fleet.add_vm(agent=False)
    other = (await stack.fleet.add_vm(agent=False)).uuid
    me = me_vm.uuid
    await asyncio.wait_for(me_vm.client_connected.wait(), 10)
    seen: list[tuple[str, dict[str, str], dict[str, object]]] = []

    async def adapter(msg: Msg) -> None:  # a host adapter on the bus, for both VMs
        seen.append((msg.subject, dict(msg.headers or {}), json.loads(msg.data or b"{}")))
        await msg.respond(json.dumps({"snapshots": [], "answered_for": msg.subject}).encode())

    nc = stack.nc
    assert nc is not None
    subs = [await nc.subscribe(f"gb.hv.{vm}.*", cb=adapter) for vm in (me, other)]
    await nc.flush()
    guest = await HandGuest.open(me_vm)
    try:
        assert (await guest.hello({"vm": me})).ok
        for method, op in SSR_FORWARD.items():
            # the payload names the other VM: the subject still names the socket's VM
            answer = await guest.request(method, {"vm": other, "snapshot": "s1", "label": "s1"})
            assert answer.ok, answer
            assert answer.result == {"snapshots": [], "answered_for": f"gb.hv.{me}.{op}"}
        assert [s for s, _, _ in seen] == [f"gb.hv.{me}.{op}" for op in SSR_FORWARD.values()]
        assert all(h[HEADER_VM] == me and h[HEADER_LINK] == "serial" for _, h, _ in seen)

        # no adapter serves this VM (e.g. its host has no libvirt access): typed, at once
        for sub in subs:
            await sub.unsubscribe()
        await nc.flush()
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await guest.request("ssr_list", {})
        assert not answer.ok and answer.code == "unavailable", answer
        assert "hypervisor adapter" in answer.message
        assert loop.time() - started < 5
    finally:
        await guest.close()
