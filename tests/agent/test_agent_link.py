"""The agent's link logic against a host-side wire Session over a real socket pair.

Standard library + pytest only, so it also runs on the guest Python (3.9).
"""

import asyncio
import socket
from typing import Any, Dict, List, Optional, Tuple

from guestbus.wire import errors
from guestbus.wire.aio import Channel, RemoteError
from guestbus_agent.config import parse_config
from guestbus_agent.link import SerialLink

VM = "5b0c1e2a-1111-4222-8333-944455556666"


def make_config(**over: Any) -> Any:
    data: Dict[str, Any] = {
        "vm_uuid": VM,
        "config_uuid": "cfg-1",
        "gateway_host": "127.0.0.1",
        "heartbeat_interval": 0.1,
        "request_timeout": 0.3,
        "serial_failure_limit": 2,
        "allowed_commands": ["ping", "allowed"],
    }
    data.update(over)
    return parse_config(data)


class Host:
    """A minimal host end: answers hello/heartbeat/report like the router would."""

    def __init__(self, stamp: str = VM) -> None:
        self.stamp = stamp
        self.calls: List[str] = []
        self.answer = True
        self.channel: Optional[Channel] = None

    async def hello(self, params: Dict[str, Any]) -> Dict[str, Any]:
        self.calls.append("hello")
        return {
            "vm": self.stamp,
            "link": "serial",
            "host": "test",
            "protocol": 1,
            "identity_matches": params.get("vm") == self.stamp,
            "heartbeat_interval": 0.1,
            "server_time": "2026-01-01T00:00:00Z",
        }

    async def rpc(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        self.calls.append(method)
        if not self.answer:
            await asyncio.sleep(10)
        return {"seq": params.get("seq", 0)}


async def pair() -> Tuple[Any, Any, Any, Any]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return ra, wa, rb, wb


async def start(
    host: Host, cfg: Any
) -> Tuple[SerialLink, "asyncio.Task[None]", "asyncio.Task[None]"]:
    ra, wa, rb, wb = await pair()
    host.channel = Channel(rb, wb, on_hello=host.hello, on_request=host.rpc)
    host_task = asyncio.ensure_future(host.channel.run())
    opened: List[int] = []

    async def opener() -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if opened:
            await asyncio.sleep(3600)  # one device only in these tests
        opened.append(1)
        return ra, wa

    link = SerialLink(cfg, opener)
    return link, asyncio.ensure_future(link.run()), host_task


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def stop(*tasks: "asyncio.Task[None]") -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_hello_then_heartbeats_and_allow_listed_commands() -> None:
    async def main() -> None:
        host = Host()
        link, task, host_task = await start(host, make_config())
        await wait_for(lambda: link.status.active and link.status.heartbeats_ok >= 3)
        assert host.calls[0] == "hello" and "report" in host.calls
        assert link.status.stamped_vm == VM
        assert host.channel is not None
        pong = await host.channel.request("ping", {}, 1.0)
        assert pong["pong"] is True
        allowed = await host.channel.request("allowed", {}, 1.0)
        assert allowed == {"commands": ["ping", "allowed"]}
        try:
            await host.channel.request("info", {}, 1.0)  # not in this VM's allow-list
        except RemoteError as exc:
            assert exc.code == errors.NOT_ALLOWED
        else:
            raise AssertionError("info should not be allowed")
        await stop(task, host_task)

    run(main())


def test_unanswered_heartbeats_take_the_link_down_and_hello_again() -> None:
    async def main() -> None:
        host = Host()
        link, task, host_task = await start(host, make_config())
        await wait_for(lambda: link.status.active)
        hellos = host.calls.count("hello")
        host.answer = False
        await wait_for(lambda: link.status.downs >= 1, timeout=5)
        assert link.status.heartbeats_failed >= 2
        await wait_for(lambda: host.calls.count("hello") > hellos)  # it says hello again
        host.answer = True
        ok = link.status.heartbeats_ok
        await wait_for(lambda: link.status.active and link.status.heartbeats_ok >= ok + 3)
        await stop(task, host_task)

    run(main())


def test_host_that_lost_its_state_gets_a_new_hello() -> None:
    async def main() -> None:
        host = Host()
        link, task, host_task = await start(host, make_config(heartbeat_interval=0.2))
        await wait_for(lambda: link.status.active)
        assert host.channel is not None
        # A restarted bridge: its session forgets the handshake, so the next heartbeat
        # is refused with hello_required and the agent must say hello again at once.
        host.channel.session.connection_lost()
        hellos = host.calls.count("hello")
        await wait_for(lambda: host.calls.count("hello") > hellos, timeout=3)
        await wait_for(lambda: link.status.active)
        await stop(task, host_task)

    run(main())


def test_identity_stamped_by_the_host_wins() -> None:
    async def main() -> None:
        other = "11111111-2222-4333-8444-555566667777"
        host = Host(stamp=other)
        link, task, host_task = await start(host, make_config())
        await wait_for(lambda: link.status.active)
        assert link.status.stamped_vm == other
        await stop(task, host_task)

    run(main())
