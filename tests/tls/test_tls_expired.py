"""An agent whose certificate has expired: only the serial link, where the hypervisor vouches
for the VM, can renew it. With serial up it renews at once; with only IP (the serial-bridge
stopped) the gateway refuses the expired certificate (reason ``expired``, counted), the agent
stays off IP, and renews as soon as serial returns.
"""

from __future__ import annotations

import pytest

from guestbus.contract import LinkKind
from guestbus.lab.hypervisor import LabVM
from guestbus_agent.agent import Agent
from guestbus_agent.identity import Identity

from ..support.waiting import holds, wait_until
from ._support import BRIDGE_HOST, TlsStack, utcnow
from .conftest import StackFactory

pytestmark = pytest.mark.timeout(90)

HEARTBEAT = 0.3
FAILURE_LIMIT = 3
WINDOW = 4.0
"""How long the test watches the agent with only IP and an expired certificate."""


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> TlsStack:
    return await make_stack(heartbeat=HEARTBEAT, serial_failure_limit=FAILURE_LIMIT)


async def vm_with_expired_certificate(stack: TlsStack) -> tuple[LabVM, str]:
    """A lab VM (no agent yet) whose agent state holds a certificate that has expired."""
    vm = await stack.lab.add_vm(agent=False)
    cert = await stack.issue(vm.uuid, lifetime=1)
    identity = Identity(stack.lab.state_root / vm.uuid)
    identity.install(cert.key_pem, cert.cert_pem, stack.ca_pem.encode())
    identity.confirm()
    info = identity.info()
    assert info is not None and info.vm == vm.uuid and info.serial == cert.serial
    await wait_until(lambda: info.expired(), 5, "the certificate to expire", 0.1)
    return vm, cert.serial


async def start_agent(stack: TlsStack, vm: LabVM) -> Agent:
    lab_agent = await stack.lab.start_agent(vm)
    assert lab_agent.agent is not None
    return lab_agent.agent


def assert_renewed(agent: Agent, old_serial: str) -> None:
    info = agent.identity.info()
    assert info is not None
    assert info.serial != old_serial
    assert info.vm == agent.config.vm_uuid
    assert not info.expired()
    assert info.not_after > utcnow()
    assert agent.enrollments == 0, "an expired certificate is renewed, not re-enrolled"


async def test_expired_certificate_is_renewed_over_serial(stack: TlsStack) -> None:
    vm, old_serial = await vm_with_expired_certificate(stack)
    agent = await start_agent(stack, vm)
    await wait_until(
        lambda: agent.renewals == 1,
        20,
        "the expired certificate renewed",
        detail=stack.agents_detail,
    )
    assert_renewed(agent, old_serial)
    assert agent.path == "serial"
    assert agent.fallbacks == 0
    info = agent.identity.info()
    assert info is not None
    record = await stack.record(info.serial)
    assert record["vm"] == vm.uuid
    assert record["state"] == "valid"
    await stack.wait_registered([vm.uuid], "serial", host=BRIDGE_HOST)


async def test_expired_certificate_is_refused_over_ip_until_serial_returns(
    stack: TlsStack,
) -> None:
    bridge = stack.bridge
    assert bridge is not None
    vm, old_serial = await vm_with_expired_certificate(stack)
    await bridge.stop()
    try:
        expired_before = stack.refused("expired")
        agent = await start_agent(stack, vm)
        # The serial link fails, the agent tries the gateway: refused as expired.
        await wait_until(
            lambda: stack.refused("expired") > expired_before,
            20,
            "the gateway to refuse the expired certificate",
            detail=stack.agents_detail,
        )
        assert agent.fallbacks == 1
        assert agent.serial.status.consecutive_failures >= FAILURE_LIMIT

        # Off IP for as long as serial is down; nothing renewed, nothing enrolled; and the
        # refused agent backs off instead of knocking on the gateway over and over.
        refused_at_start = stack.refused("expired")
        await holds(lambda: agent.path != "ip", WINDOW, "the agent stays off IP")
        assert agent.renewals == 0 and agent.enrollments == 0
        # the bridge may have recorded the VM it discovered, but no hello ever got through
        record = (await stack.records()).get(vm.uuid)
        assert record is None or (record.last_hello is None and record.link is LinkKind.DOWN)
        attempts = stack.refused("expired") - refused_at_start
        assert attempts <= 5, f"{attempts} refused reconnects in {WINDOW}s: no backoff"
    finally:
        bridge.start()
        await bridge.wait_ready()

    # Serial returns: renewed over serial, the IP attempts stop.
    await wait_until(
        lambda: agent.renewals == 1, 20, "the renewal over serial", detail=stack.agents_detail
    )
    assert_renewed(agent, old_serial)
    await stack.wait_paths([vm.uuid], "serial")
    await wait_until(lambda: agent.ip is None, 10, "the agent to stop trying IP")
    await stack.wait_registered([vm.uuid], "serial", host=BRIDGE_HOST)
