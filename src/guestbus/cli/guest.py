"""``guestbus ping`` / ``guestbus info``: host → guest commands over the VM's link."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid as uuidlib
from typing import Any

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from guestbus.cli.common import CliError, add_nats_option, resolve_vm, run_async, with_bus
from guestbus.contract import HEADER_DEADLINE_MS, HEADER_REQUEST_ID, guest_subject
from guestbus.runtime.errors import BusError


async def command(
    nc: Client, vm: str, method: str, params: dict[str, Any], timeout: float
) -> tuple[dict[str, Any], float]:
    """Run one command in the guest; returns (result, round-trip seconds)."""
    headers = {
        HEADER_REQUEST_ID: "cli-" + uuidlib.uuid4().hex[:16],
        HEADER_DEADLINE_MS: str(int(timeout * 1000)),
    }
    started = time.perf_counter()
    try:
        msg = await nc.request(
            guest_subject(vm, method),
            json.dumps(params).encode(),
            timeout=timeout + 1,
            headers=headers,
        )
    except NoRespondersError:
        raise CliError(
            f"no_active_link: no serial-bridge or gateway holds a link to VM {vm} "
            "(is the VM running on a host with a bridge?)"
        ) from None
    except NatsTimeout:
        raise CliError(f"timeout: VM {vm} did not answer {method} within {timeout:g}s") from None
    rtt = time.perf_counter() - started
    err = BusError.from_reply(msg.headers, msg.data)
    if err is not None:
        raise CliError(f"{err.code}: {err.message}")
    result = json.loads(msg.data) if msg.data else {}
    return (result if isinstance(result, dict) else {"result": result}), rtt


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ping",
        help="host → guest round trip over the VM's link; prints the RTT",
        description="Ping the agent inside a VM (by uuid, name or unique uuid prefix).",
    )
    p.add_argument("vm", help="VM uuid, name, or unique uuid prefix")
    p.add_argument("-c", "--count", type=int, default=1, help="how many pings (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per ping (default 5)")
    add_nats_option(p)
    p.set_defaults(func=run_ping)

    p = sub.add_parser(
        "info",
        help="what the agent reports: hostname, OS, kernel, interfaces, uptime, its own use",
        description="Ask the agent inside a VM for its host information.",
    )
    p.add_argument("vm", help="VM uuid, name, or unique uuid prefix")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    add_nats_option(p)
    p.set_defaults(func=run_info)


def run_ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        print("error: --count must be at least 1")
        return 2

    async def work(nc: Client) -> int:
        rec = await resolve_vm(nc, args.vm)
        for i in range(args.count):
            _, rtt = await command(nc, rec.uuid, "ping", {}, args.timeout)
            print(
                f"pong from {rec.name or rec.uuid} via {rec.link.value}@{rec.host}: "
                f"seq={i + 1} rtt={rtt * 1000:.2f} ms"
            )
            if i + 1 < args.count:
                await asyncio.sleep(0.2)
        return 0

    return run_async(with_bus(args, work))


def run_info(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        rec = await resolve_vm(nc, args.vm)
        info, _ = await command(nc, rec.uuid, "info", {}, args.timeout)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"{'vm:':<15}{rec.uuid}" + (f" ({rec.name})" if rec.name else ""))
        for key in ("hostname", "os", "kernel", "arch", "agent_version", "python"):
            if key in info:
                print(f"{key + ':':<15}{info[key]}")
        if "uptime" in info:
            print(f"{'uptime:':<15}{float(info['uptime']):.0f} s")
        if info.get("agent_rss_bytes") is not None:
            rss_mib = int(info["agent_rss_bytes"]) / (1024 * 1024)
            cpu = float(info.get("agent_cpu_seconds") or 0)
            print(f"{'agent uses:':<15}{rss_mib:.1f} MiB resident, {cpu:.2f} s CPU since start")
        print("interfaces:")
        for iface in info.get("interfaces", []):
            addrs = ", ".join(iface.get("addresses", [])) or "-"
            print(f"  {iface.get('name', '?'):<12} {iface.get('mac') or '-':<18} {addrs}")
        return 0

    return run_async(with_bus(args, work))
