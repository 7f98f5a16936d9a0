"""One hostile guest (driven by hand on its serial port) against a serial-bridge process:
garbage, oversize frames and a flood are dropped and counted by reason, the guest gets clear
errors, and the other VMs' pings and heartbeats carry on; the bridge stays up."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from nats.aio.msg import Msg

from guestbus.lab.hypervisor import LabVM
from guestbus.wire import MAX_FRAME, encode_frame

from ..support.probes import Samples, http_status, sample
from ..support.waiting import wait_until
from ._support import HandGuest, LinkStack, Reply, StackFactory, command

pytestmark = pytest.mark.timeout(90)

N_GOOD = 5
RATE, BURST = 20.0, 40


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> LinkStack:
    stack = await make_stack(
        bridge_mode="process",
        heartbeat=0.5,
        bridge_config={"rate_limit": RATE, "rate_burst": BURST},
    )
    await stack.fleet.add_vms(N_GOOD)
    await stack.wait_active(stack.fleet.agents)
    return stack


@pytest.fixture
async def hostile(stack: LinkStack) -> AsyncIterator[tuple[LabVM, HandGuest]]:
    """A fresh VM with no agent; the test writes its guest side by hand."""
    vm = await stack.fleet.add_vm(agent=False)
    await asyncio.wait_for(vm.client_connected.wait(), 10)  # the bridge holds its socket
    guest = await HandGuest.open(vm)
    try:
        yield vm, guest
    finally:
        await guest.close()


def drops(samples: Samples, reason: str) -> float:
    return sample(samples, "guestbus_bridge_bad_frames_total", reason=reason)


def raw_frame(body: bytes, crc: int | None = None) -> bytes:
    checksum = zlib.crc32(body) if crc is None else crc
    return b"\x1eGB1 %08x " % checksum + body + b"\n"


async def assert_others_fine(stack: LinkStack) -> None:
    for vm in list(stack.fleet.agents):
        reply = await command(stack.bus, vm, "ping", deadline_ms=2000, timeout=3)
        assert reply.ok()["pong"] is True
    assert stack.bridge.alive, stack.bridge.log_tail()
    assert await http_status(stack.bridge.http_port, "/healthz") == 200


async def test_garbage_and_malformed_frames_are_dropped_and_counted_by_reason(
    stack: LinkStack, hostile: tuple[LabVM, HandGuest]
) -> None:
    vm, guest = hostile
    before = await stack.bridge.metrics()
    event = b'{"kind":"evt","method":"x","params":{}}'
    bad_params = {"kind": "req", "id": "bad-1", "method": "ping", "params": [], "deadline_ms": 9}
    expected = {
        "bad_header": 1,
        "bad_checksum": 1,
        "bad_json": 2,
        "truncated": 1,
        "bad_message": 2,
        "not_ready": 1,
        "unknown_response": 1,
    }
    # line noise without a frame start: skipped as noise (no frame, nothing to drop)
    guest.write(b"\x00\xff\x1b[0m boot noise \xc3\x28 [  1.234] console line\r\n" * 64)
    guest.write(raw_frame(event).replace(b"GB1 ", b"GB1 zz", 1))  # bad_header
    guest.write(raw_frame(event, zlib.crc32(event) ^ 1))  # bad_checksum
    guest.write(raw_frame(b"{not json"))  # bad_json
    guest.write(raw_frame(b"[1,2,3]"))  # bad_json: not an object
    guest.write(b'\x1eGB1 0123abcd {"kind":')  # truncated by the next frame's RS
    guest.write(encode_frame({"kind": "bogus"}))  # bad_message
    guest.write(encode_frame(bad_params))  # bad_message, answered bad_request
    guest.write(encode_frame({"kind": "res", "id": "never-sent", "result": {}}))
    early = guest.send("heartbeat", {"seq": 1})  # not_ready: before hello

    assert (await guest.wait_answers([early]))[0].code == "hello_required"
    await wait_until(lambda: guest.answer_to("bad-1") is not None, 10, "answer to bad-1")
    answer = guest.answer_to("bad-1")
    assert answer is not None and answer["error"]["code"] == "bad_request"

    # the stream resynchronised: the handshake and RPCs work; wrong schemas get clear errors
    hello = await guest.hello({"vm": vm.uuid})
    assert hello.ok and hello.result is not None and hello.result["vm"] == vm.uuid
    wrong = await guest.request("heartbeat", {"seq": -5})
    assert not wrong.ok and wrong.code == "bad_request" and "seq" in wrong.message
    assert (await guest.request("heartbeat", {"seq": 1})).ok

    after = await stack.bridge.metrics()
    counted = {r: drops(after, r) - drops(before, r) for r in expected}
    assert counted == expected
    await assert_others_fine(stack)


async def test_oversize_frames_are_dropped_counted_and_the_stream_resynchronises(
    stack: LinkStack, hostile: tuple[LabVM, HandGuest]
) -> None:
    vm, guest = hostile
    assert (await guest.hello()).ok
    got: list[Msg] = []

    async def on_guest_event(msg: Msg) -> None:
        got.append(msg)

    sub = await stack.bus.subscribe(f"gb.evt.guest.{vm.uuid}", cb=on_guest_event)
    await stack.bus.flush()
    before = await stack.bridge.metrics()

    def event_of_size(size: int) -> bytes:
        head = encode_frame({"kind": "evt", "method": "big", "params": {"pad": ""}})
        frame = encode_frame(
            {"kind": "evt", "method": "big", "params": {"pad": "A" * (size - len(head))}},
            max_frame=1 << 24,
        )
        assert len(frame) == size
        return frame

    guest.write(event_of_size(MAX_FRAME))  # exactly 256 KiB: accepted
    guest.write(event_of_size(MAX_FRAME + 1))  # one byte over: oversize
    guest.write(b'\x1eGB1 00000000 {"pad":"' + b"B" * 600_000)  # no end at all: oversize
    ok = await guest.request("heartbeat", {"seq": 7})  # the next RS starts a fresh frame
    assert ok.ok, ok

    after = await stack.bridge.metrics()
    assert drops(after, "oversize") - drops(before, "oversize") == 2
    for reason in ("bad_header", "bad_checksum", "bad_json", "truncated"):
        assert drops(after, reason) == drops(before, reason), reason
    # the 256 KiB event went through to the bus, the oversize one did not
    await wait_until(lambda: len(got) >= 1, 10, "the 256 KiB guest event on the bus")
    await stack.bus.flush()
    assert len(got) == 1
    assert len(json.loads(got[0].data)["params"]["pad"]) > 250_000
    await sub.unsubscribe()
    await assert_others_fine(stack)


async def test_flood_is_rate_limited_counted_and_other_vms_keep_working(
    stack: LinkStack, hostile: tuple[LabVM, HandGuest]
) -> None:
    vm, guest = hostile
    assert (await guest.hello()).ok
    good = list(stack.fleet.agents)
    loop = asyncio.get_running_loop()

    forwarded: list[Msg] = []

    async def on_guest_event(msg: Msg) -> None:
        forwarded.append(msg)

    sub = await stack.bus.subscribe(f"gb.evt.guest.{vm.uuid}", cb=on_guest_event)
    await stack.bus.flush()

    # the other VMs, watched all through the flood
    stop = asyncio.Event()
    pings: list[Reply] = []
    ping_failures: list[str] = []
    lost_link: set[str] = set()

    async def pinger() -> None:
        while not stop.is_set():
            for other in good:
                try:
                    pings.append(
                        await command(stack.bus, other, "ping", deadline_ms=2000, timeout=3)
                    )
                except Exception as exc:
                    ping_failures.append(f"{other}: {exc!r}")

    async def link_watch() -> None:
        while not stop.is_set():
            lost_link.update(v for v in good if not stack.agent_link(v).status.active)
            await asyncio.sleep(0.01)

    watchers = [asyncio.ensure_future(pinger()), asyncio.ensure_future(link_watch())]
    before = await stack.bridge.metrics()
    flood_start = datetime.now(UTC)
    started = loop.time()

    n_requests, n_events = 3000, 2000
    data = bytearray()
    rids = []
    for i in range(n_requests):
        rid, frame = guest.session.send_request("heartbeat", {"seq": i}, 30.0)
        rids.append(rid)
        data += frame
    for i in range(n_events):
        data += guest.session.send_event("flood", {"i": i})
    rid, frame = guest.session.send_request("heartbeat", {"seq": n_requests}, 30.0)
    rids.append(rid)  # last in the stream: once answered, every frame before was handled
    data += frame
    guest.write(bytes(data))

    answers = await guest.wait_answers(rids, timeout=40)
    flood_time = loop.time() - started
    admitted = [a for a in answers if a.ok]
    limited = [a for a in answers if a.code == "rate_limited"]
    assert len(admitted) + len(limited) == len(rids), {a.code for a in answers}
    # the bucket: a burst, then the rate; the rest refused with a clear error
    allowed = BURST + RATE * flood_time + 2
    assert 1 <= len(admitted) <= allowed, (len(admitted), flood_time)
    assert "too many frames" in limited[0].message
    # events beyond the limit are dropped, not forwarded
    await stack.bus.flush()
    assert len(forwarded) + len(admitted) <= allowed

    async def counted() -> bool:
        after = await stack.bridge.metrics()
        delta = drops(after, "rate_limited") - drops(before, "rate_limited")
        return delta == len(limited) + (n_events - len(forwarded))

    await wait_until(counted, 10, "every refused frame counted as rate_limited", 0.1)

    # the others: heartbeats landed during the flood, every ping answered, no link lost
    async def heartbeats_after_flood_start() -> bool:
        recs = await stack.records()
        return all((hb := recs[v].last_heartbeat) is not None and hb > flood_start for v in good)

    await wait_until(heartbeats_after_flood_start, 10, "heartbeats of the other VMs")
    stop.set()
    await asyncio.gather(*watchers)
    assert not ping_failures, ping_failures
    assert pings and all(p.error is None for p in pings), [p.code for p in pings if p.error]
    slowest = max(p.elapsed for p in pings)
    assert slowest < 1.0, f"a ping of another VM took {slowest:.3f}s during the flood"
    assert not lost_link, f"VMs lost their link during another VM's flood: {lost_link}"

    # the limit is a rate, not a ban: the hostile VM is served again once it calms down
    async def served_again() -> bool:
        answer = await guest.request("heartbeat", {"seq": n_requests + 1})
        return answer.ok

    await wait_until(served_again, 10, "the flooding VM to be served again", 0.2)
    await sub.unsubscribe()
    await assert_others_fine(stack)


async def test_unknown_guest_rpc_is_answered_at_the_edge(
    stack: LinkStack, hostile: tuple[LabVM, HandGuest]
) -> None:
    vm, guest = hostile
    hello = await guest.hello({"vm": vm.uuid})
    assert hello.ok
    before = await stack.bridge.metrics()
    answer = await guest.request("reboot_host", {})
    # A typed unknown_method naming what exists, not "no service answers" (which would send
    # an operator looking for a crashed service), and counted by the bridge.
    assert not answer.ok and answer.code == "unknown_method"
    assert "heartbeat" in answer.message
    after = await stack.bridge.metrics()
    assert drops(after, "unknown_method") - drops(before, "unknown_method") == 1
    assert (await guest.request("heartbeat", {"seq": 1})).ok
