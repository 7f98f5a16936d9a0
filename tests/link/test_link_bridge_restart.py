"""kill -9 of the serial-bridge process: every link returns, a retried command runs once,
the registry stays exactly the fleet."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from guestbus.contract import KV_VMS, LinkKind, LinkState

from ..support.probes import sample
from ..support.process import AsyncServiceProcess
from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, CommandCounter, LinkStack, Reply, StackFactory, command

pytestmark = pytest.mark.timeout(90)

N_VMS = 20


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> LinkStack:
    stack = await make_stack(bridge_mode="process", heartbeat=0.5, down_grace=30.0)
    await stack.fleet.add_vms(N_VMS)
    return stack


async def retry_until_answered(
    stack: LinkStack, vm: str, request_id: str, timeout: float = 20.0
) -> tuple[Reply, list[str]]:
    """What a careful caller does: retry with the same GB-Request-Id until the guest answers.
    Returns the answer and the failures seen on the way."""
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        try:
            reply = await command(
                stack.bus, vm, "ping", request_id=request_id, deadline_ms=2000, timeout=3
            )
        except (NoRespondersError, NatsTimeoutError) as exc:
            failures.append(type(exc).__name__)
        else:
            if reply.error is None:
                return reply, failures
            assert reply.code in ("no_active_link", "timeout", "link_lost"), reply
            failures.append(str(reply.code))
        await asyncio.sleep(0.2)
    raise AssertionError(f"no answer to {request_id} within {timeout}s; failures: {failures}")


async def test_bridge_kill9_restart_links_return_and_retried_command_runs_once(
    stack: LinkStack,
) -> None:
    vms = list(stack.fleet.agents)
    assert len(vms) == N_VMS
    await stack.wait_active(vms, timeout=30)
    await stack.wait_registered(vms)
    bridge = stack.bridge
    assert isinstance(bridge, AsyncServiceProcess)
    first_pid = bridge.proc.pid if bridge.proc else None

    done_vm, inflight_vm = vms[0], vms[1]
    done_runs = CommandCounter(stack.fleet.agents[done_vm], "ping")
    inflight_runs = CommandCounter(stack.fleet.agents[inflight_vm], "ping")

    # A: a command answered before the crash; its caller retries it anyway afterwards.
    first = (await command(stack.bus, done_vm, "ping", request_id="restart-done-1")).ok()
    assert done_runs.calls == 1

    # B: a command running in the guest when the bridge dies; its answer is lost.
    inflight_runs.gate.clear()
    inflight = asyncio.ensure_future(
        command(stack.bus, inflight_vm, "ping", request_id="inflight-1", deadline_ms=30000)
    )
    await asyncio.wait_for(inflight_runs.started.wait(), 10)
    assert inflight_runs.calls == 1

    hellos_before = {vm: stack.agent_link(vm).status.hellos for vm in vms}
    killed_at = datetime.now(UTC)
    mark = stack.events.mark()
    bridge.kill()
    dropped_before = stack.fleet.hypervisor.vms[inflight_vm].stats.dropped_guest_bytes
    inflight_runs.gate.set()  # the guest answers into a serial port nobody is reading
    await stack.fleet.hypervisor.vms[inflight_vm].wait_until(
        lambda v: v.stats.dropped_guest_bytes > dropped_before, timeout=10
    )

    bridge.start()
    await bridge.wait_ready()
    with pytest.raises(NatsTimeoutError):
        await inflight  # its caller (5 s timeout) never got that answer
    assert bridge.proc is not None and bridge.proc.pid != first_pid

    # every agent said hello again to the new bridge and is active
    await wait_until(
        lambda: all(
            stack.agent_link(vm).status.active
            and stack.agent_link(vm).status.hellos > hellos_before[vm]
            for vm in vms
        ),
        30,
        "all 20 agents to re-hello and be active",
        0.1,
        stack.agents_detail,
    )
    # the new bridge announced every link up again
    for vm in vms:
        states = [e.state for e in stack.events.link_events(vm, since=mark)]
        assert LinkState.UP in states, f"{vm}: no link-up event after the restart: {states}"

    async def links_up() -> bool:
        return sample(await bridge.metrics(), "guestbus_bridge_links", state="up") == N_VMS

    await wait_until(links_up, 10, "the new bridge to count 20 links up", 0.2)

    # the retried in-flight command: answered from the guest's memory, not run again
    retried, failures = await retry_until_answered(stack, inflight_vm, "inflight-1")
    assert retried.ok()["pong"] is True
    assert inflight_runs.calls == 1, f"ran {inflight_runs.calls} times (failures: {failures})"

    # the command answered before the crash: the retry replays the very same answer
    again = await command(stack.bus, done_vm, "ping", request_id="restart-done-1")
    assert again.ok() == first
    assert done_runs.calls == 1

    # a new request id does run (the counters count real runs)
    assert (await command(stack.bus, done_vm, "ping", request_id="restart-done-2")).ok()
    assert done_runs.calls == 2

    # the registry is exactly the fleet: no duplicates, no strays, all re-registered via serial
    async def reregistered() -> bool:
        recs = await stack.records()
        return all((h := recs[vm].last_hello) is not None and h > killed_at for vm in vms)

    await wait_until(reregistered, 15, "every VM to re-register after the restart", 0.1)
    records = await stack.records()
    assert set(records) == set(vms)
    for vm in vms:
        rec = records[vm]
        assert rec.link is LinkKind.SERIAL and rec.host == BRIDGE_HOST, rec
        assert rec.last_heartbeat is not None and rec.last_heartbeat > killed_at
    # and the bucket itself holds exactly those keys (every subject the KV stream has)
    info = await stack.bus.jetstream().stream_info(f"KV_{KV_VMS}", subjects_filter=">")
    subjects = info.state.subjects or {}
    assert sorted(subjects) == sorted(f"$KV.{KV_VMS}.{vm}" for vm in vms)


async def test_retry_while_the_first_copy_is_in_flight_shares_its_answer(
    stack: LinkStack,
) -> None:
    """A caller that gave up early retries with the same GB-Request-Id while the guest is
    still working on the first copy: the retry waits for that same run."""
    vms = list(stack.fleet.agents)
    await stack.wait_active(vms, timeout=30)
    vm = vms[2]
    runs = CommandCounter(stack.fleet.agents[vm], "ping")
    runs.gate.clear()
    with pytest.raises(NatsTimeoutError):  # the first caller gives up after 1 s
        await command(stack.bus, vm, "ping", request_id="slow-1", deadline_ms=15000, timeout=1)
    assert runs.calls == 1

    retry = asyncio.ensure_future(
        command(stack.bus, vm, "ping", request_id="slow-1", deadline_ms=15000, timeout=15)
    )
    done, _ = await asyncio.wait({retry}, timeout=1.0)
    assert not done, f"the retry did not wait for the running copy: {retry.result()}"
    runs.gate.set()
    reply = await retry
    assert reply.ok()["pong"] is True
    assert runs.calls == 1

    # and once answered, a later retry is answered from the guest's memory, still one run
    again = await command(stack.bus, vm, "ping", request_id="slow-1")
    assert again.ok() == reply.ok()
    assert runs.calls == 1
