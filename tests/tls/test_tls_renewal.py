"""A fleet renews its own certificates: 50 lab VMs enroll over serial, then each renews before
its certificate expires, at 2/3 of the lifetime plus up to 5 % jitter (step-ca / SPIRE
practice), so the renewals spread out instead of hitting the CA in the same second.

Wall time: the CA issues 60-second certificates (the smallest lifetime it allows). NotBefore is
backdated 60 s for clock skew, so each certificate spans 120 s and the agent renews it 80 to
86 s after NotBefore, i.e. 20 to 26 s after it was issued: this module takes about 35 s.
"""

from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass

import pytest

from guestbus_agent.identity import CertInfo

from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, TlsStack, agent_files, attempt_refused, utcnow
from .conftest import StackFactory

pytestmark = pytest.mark.timeout(110)

N_VMS = 50
LIFETIME = 60
JITTER = 0.05


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> TlsStack:
    return await make_stack(
        vm_cert_lifetime=LIFETIME, heartbeat=1.0, serial_failure_limit=3, request_timeout=2.0
    )


@dataclass
class Renewal:
    vm: str
    first: CertInfo
    at: datetime.datetime
    """When the agent's renewal counter moved (wall clock, to ~20 ms)."""

    @property
    def offset(self) -> float:
        """Seconds after the first certificate's NotBefore."""
        return (self.at - self.first.not_before).total_seconds()


async def watch_renewals(
    stack: TlsStack, first: dict[str, CertInfo], timeout: float
) -> dict[str, Renewal]:
    """Sample every agent's renewal counter until each has renewed once."""
    seen: dict[str, Renewal] = {}

    def sample() -> bool:
        now = utcnow()
        for vm, info in first.items():
            if vm not in seen and stack.agent(vm).renewals >= 1:
                seen[vm] = Renewal(vm, info, now)
        return len(seen) == len(first)

    await wait_until(
        sample,
        timeout,
        f"all {len(first)} agents to renew ({len(seen)} so far)",
        0.02,
        stack.agents_detail,
    )
    return seen


async def test_fleet_enrolls_then_renews_spread_out_before_expiry(stack: TlsStack) -> None:
    for _ in range(N_VMS):
        await stack.lab.add_vm()
    vms = list(stack.lab.agents)
    assert len(vms) == N_VMS

    await wait_until(
        lambda: all(stack.agent(v).enrollments == 1 for v in vms),
        40,
        f"{N_VMS} agents enrolled over serial",
        0.05,
        stack.agents_detail,
    )
    first: dict[str, CertInfo] = {}
    for vm in vms:
        info = stack.agent(vm).identity.info()
        assert info is not None and info.vm == vm
        first[vm] = info
    lifetime = first[vms[0]].lifetime
    # 60 s of validity after issue + 60 s of backdating.
    assert lifetime == pytest.approx(2 * LIFETIME, abs=1)
    await stack.wait_registered(vms, "serial", host=BRIDGE_HOST, timeout=30)

    latest_due = max(i.not_before for i in first.values()) + datetime.timedelta(
        seconds=lifetime * (2 / 3 + JITTER)
    )
    budget = (latest_due - utcnow()).total_seconds() + 15
    renewals = await watch_renewals(stack, first, budget)

    # Each renewed once, before its certificate expired, with a new certificate that the CA
    # links to the old one.
    for vm, renewal in renewals.items():
        agent = stack.agent(vm)
        assert renewal.at < renewal.first.not_after, f"{vm} renewed after expiry"
        new = agent.identity.info()
        assert new is not None and new.vm == vm
        assert new.serial != renewal.first.serial
        assert new.not_after > renewal.first.not_after
        assert agent.enrollments == 1 and agent.fallbacks == 0
        assert agent.path == "serial"
    sample_vm = vms[0]
    new_serial = stack.agent(sample_vm).identity.info()
    assert new_serial is not None
    record = await stack.record(new_serial.serial)
    assert record["renewal_of"] == first[sample_vm].serial
    assert record["vm"] == sample_vm

    # When: at the 2/3 point plus up to 5 % jitter (plus the round trip to the CA).
    two_thirds = lifetime * 2 / 3
    past = [r.offset - two_thirds for r in renewals.values()]
    assert min(past) >= -0.1, f"a renewal came before the 2/3 point: {min(past):.2f}s"
    assert max(past) <= lifetime * JITTER + 2.0, f"a renewal came late: {max(past):.2f}s"
    # Spread: uniform jitter over 6 s for 50 agents leaves them nowhere near one second.
    spread = max(past) - min(past)
    assert spread >= lifetime * JITTER * 0.4, f"renewals bunched within {spread:.2f}s"
    assert statistics.pstdev(past) >= 0.5
    seconds = {int(r.at.timestamp()) for r in renewals.values()}
    assert len(seconds) >= 4, f"renewals fell into only {len(seconds)} distinct seconds"

    # A revoked certificate is refused at the gateway, even a freshly renewed one.
    victim = vms[1]
    current = stack.agent(victim).identity.info()
    assert current is not None
    assert (await stack.revoke(current.serial))["revoked"] == [current.serial]
    before = stack.refused("revoked")
    await attempt_refused(stack, agent_files(stack.agent(victim).identity), victim)
    await wait_until(lambda: stack.refused("revoked") == before + 1, 5, "the refusal counted")
    # The other agents' renewed certificates are good at the gateway.
    client = await stack.connect(agent_files(stack.agent(vms[2]).identity))
    try:
        assert (await client.hello(vms[2]))["vm"] == vms[2]
    finally:
        await client.close()
