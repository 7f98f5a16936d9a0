"""Serial first, mutual TLS as fallback: the serial-bridge (its own process) stops, every
agent moves to the gateway after ``serial_failure_limit`` unanswered heartbeats and host
commands keep working over IP; the bridge returns, every agent goes back to serial and closes
its IP link. Host commands issued all along either succeed or fail with a typed error, within
their deadline: none is silently lost.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest

from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, GATEWAY_NAME, Outcome, TlsStack, host_command
from .conftest import StackFactory

pytestmark = pytest.mark.timeout(90)

N_VMS = 4
HEARTBEAT = 0.3
FAILURE_LIMIT = 3
REQUEST_TIMEOUT = 1.0
DEADLINE_MS = 1000
"""Deadline of each host ping (GB-Deadline-Ms)."""
PING_TIMEOUT = 3.0
"""How long the caller waits for any answer; a NATS timeout would mean a lost request."""
TYPED = {"no_active_link", "link_lost", "timeout", "unavailable"}
"""Typed errors a command may get while its VM's link moves."""


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> TlsStack:
    stack = await make_stack(
        heartbeat=HEARTBEAT, serial_failure_limit=FAILURE_LIMIT, request_timeout=REQUEST_TIMEOUT
    )
    for _ in range(N_VMS):
        await stack.lab.add_vm()
    vms = list(stack.lab.agents)
    # Every agent enrolls over serial first: without a certificate there is no fallback.
    await wait_until(
        lambda: all(stack.agent(v).enrollments == 1 for v in vms),
        30,
        "every agent enrolled over serial",
        detail=stack.agents_detail,
    )
    await stack.wait_paths(vms, "serial")
    await stack.wait_registered(vms, "serial", host=BRIDGE_HOST)
    return stack


def fallback_bound() -> float:
    """Seconds from the bridge's death to the agent on IP: ``serial_failure_limit`` heartbeats,
    each up to its interval (+10 % jitter) plus its timeout, then a TLS connect and hello;
    generous slack for a loaded 2-core machine."""
    per_failure = HEARTBEAT * 1.1 + min(REQUEST_TIMEOUT, HEARTBEAT)
    return FAILURE_LIMIT * per_failure + 5.0


class Pinger:
    """Host pings to every VM, back to back, until stopped; every outcome is kept."""

    def __init__(self, stack: TlsStack, vms: list[str]) -> None:
        self.stack = stack
        self.outcomes: list[Outcome] = []
        self.stopping = asyncio.Event()
        self._ids = itertools.count()
        self.tasks = [asyncio.ensure_future(self._run(vm)) for vm in vms]

    async def _run(self, vm: str) -> None:
        while not self.stopping.is_set():
            outcome = await host_command(
                self.stack.bus,
                vm,
                "ping",
                deadline_ms=DEADLINE_MS,
                timeout=PING_TIMEOUT,
                request_id=f"fallback-{next(self._ids)}",
            )
            self.outcomes.append(outcome)
            if not outcome.ok:  # do not spin on instant no-responder answers
                await asyncio.sleep(0.02)

    def mark(self) -> int:
        return len(self.outcomes)

    def ok_since(self, mark: int, vm: str) -> int:
        return sum(1 for o in self.outcomes[mark:] if o.vm == vm and o.ok)

    async def stop(self) -> list[Outcome]:
        self.stopping.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), PING_TIMEOUT + 2)
        return self.outcomes


async def test_bridge_down_agents_fall_back_to_tls_and_return_to_serial(
    stack: TlsStack,
) -> None:
    vms = list(stack.lab.agents)
    bridge = stack.bridge
    assert bridge is not None
    fallbacks = {v: stack.agent(v).fallbacks for v in vms}
    pinger = Pinger(stack, vms)
    try:
        await wait_until(
            lambda: all(pinger.ok_since(0, v) >= 2 for v in vms), 10, "pings answered on serial"
        )

        # --- the serial-bridge stops: every agent ends on IP ---------------------------
        t_stop = asyncio.get_running_loop().time()
        await bridge.stop()
        t_stopped = asyncio.get_running_loop().time()
        took = await stack.wait_paths(vms, "ip", timeout=fallback_bound() + 10)
        t_ip = asyncio.get_running_loop().time()
        assert took <= fallback_bound(), f"fallback took {took:.1f}s"
        for vm in vms:
            agent = stack.agent(vm)
            assert agent.fallbacks == fallbacks[vm] + 1, "exactly one fallback per agent"
            assert agent.serial.status.consecutive_failures >= FAILURE_LIMIT
            assert not agent.serial.status.active
        records = await stack.wait_registered(vms, "ip", host=GATEWAY_NAME)
        assert all(records[v].hostname for v in vms)
        on_ip = pinger.mark()
        await wait_until(
            lambda: all(pinger.ok_since(on_ip, v) >= 3 for v in vms),
            10,
            "host pings answered over IP",
        )
        # They really went through the gateway's link terminator.
        for vm in vms:
            term = stack.gateway.terminators[vm]
            assert term.up and term.connected
        assert (
            stack.router_metric(
                "guestbus_gateway_command_seconds_count", method="ping", outcome="ok"
            )
            >= 3 * N_VMS
        )
        ping = await host_command(stack.bus, vms[0], "ping")
        assert ping.ok and ping.result is not None and ping.result["pong"] is True

        # --- the bridge returns: every agent goes back to serial, IP links closed -------
        t_restart = asyncio.get_running_loop().time()
        bridge.start()
        await bridge.wait_ready()
        t_ready = asyncio.get_running_loop().time()
        await stack.wait_paths(vms, "serial", timeout=20)
        t_serial = asyncio.get_running_loop().time()
        await wait_until(
            lambda: all(stack.agent(v).ip is None for v in vms), 10, "agents to close IP"
        )
        await stack.wait_registered(vms, "serial", host=BRIDGE_HOST)
        await wait_until(
            lambda: not any(stack.gateway.terminators[v].connected for v in vms),
            10,
            "the gateway to see every IP link closed",
        )
        assert not any(stack.gateway.terminators[v].up for v in vms)
        back = pinger.mark()
        await wait_until(
            lambda: all(pinger.ok_since(back, v) >= 3 for v in vms),
            10,
            "host pings answered over serial again",
        )
    finally:
        outcomes = await pinger.stop()

    # --- every ping across both switches: answered or a typed error, in time ----------
    kinds = Counter(o.kind for o in outcomes)

    def story() -> str:
        marks = (
            f"bridge stopped at +{t_stopped - t_stop:.2f}s, all on IP at +{t_ip - t_stop:.2f}s, "
            f"bridge restarted at +{t_restart - t_stop:.2f}s, ready at +{t_ready - t_stop:.2f}s, "
            f"all on serial at +{t_serial - t_stop:.2f}s"
        )
        failures = [
            f"  +{o.started - t_stop:.3f}s {o.vm[:8]} {o.kind} after {o.elapsed:.3f}s {o.message}"
            for o in outcomes
            if o.kind not in ("ok", "no_responders")
        ]
        return "\n".join([marks, *failures])

    unexpected = {
        k: n for k, n in kinds.items() if k != "ok" and k not in TYPED | {"no_responders"}
    }
    assert not unexpected, f"pings lost or failed untyped: {unexpected} ({dict(kinds)})\n{story()}"
    slowest = max(o.elapsed for o in outcomes)
    assert slowest <= DEADLINE_MS / 1000 + 1.0, f"a ping hung for {slowest:.2f}s\n{story()}"
    for o in outcomes:
        if not o.ok and o.kind != "no_responders":
            assert o.message, f"typed error without a message: {o}"
    assert kinds["ok"] >= 8 * N_VMS
    # Still on serial and stable: nothing flaps back to IP.
    assert all(stack.agent(v).path == "serial" for v in vms)


async def test_host_renew_command_over_ip(stack: TlsStack) -> None:
    """``guestbus cert renew`` for a VM on the IP fallback: the renewal goes over the TLS
    link, the agent reconnects with the new certificate and the caller gets its serial."""
    vms = list(stack.lab.agents)
    vm = vms[0]
    bridge = stack.bridge
    assert bridge is not None
    await stack.wait_paths(vms, "serial")
    await bridge.stop()
    try:
        await stack.wait_paths([vm], "ip", timeout=fallback_bound() + 10)
        agent = stack.agent(vm)
        old = agent.identity.info()
        assert old is not None
        assert stack.gateway.connections[vm][0] == old.serial
        renewals, fallbacks = agent.renewals, agent.fallbacks
        reply = await host_command(stack.bus, vm, "renew", deadline_ms=20000, timeout=25)
        assert reply.ok, reply
        assert reply.result is not None
        new_serial = reply.result["serial"]
        assert new_serial != old.serial
        assert reply.result["link"] == "ip"
        # Answered before the agent swapped its connection; counted once the new one works.
        await wait_until(lambda: agent.renewals == renewals + 1, 15, "the renewal confirmed")
        assert agent.fallbacks == fallbacks, "a renewal reconnect is not a fallback"
        new = agent.identity.info()
        assert new is not None and new.serial == new_serial and new.vm == vm
        record = await stack.record(new_serial)
        assert record["renewal_of"] == old.serial
        # Back on IP with the new certificate.
        await stack.wait_paths([vm], "ip", timeout=15)
        await wait_until(
            lambda: stack.gateway.connections.get(vm, ("", None))[0] == new_serial,
            10,
            "the gateway to hold the link of the renewed certificate",
        )
        assert (await host_command(stack.bus, vm, "ping")).ok
    finally:
        if not bridge.alive:
            bridge.start()
            await bridge.wait_ready()
    await stack.wait_paths(vms, "serial", timeout=20)
