"""``guestbus bus tail``: a readable live view of bus traffic."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from guestbus.cli.common import add_nats_option, run_async, with_bus


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bus", help="look at the bus", description="Look at the bus.")
    bus_sub = p.add_subparsers(dest="bus_command", metavar="COMMAND", required=True)
    t = bus_sub.add_parser(
        "tail",
        help="print messages as they pass (default subject gb.>)",
        description="Print bus messages live: time, subject, guestbus headers, JSON payload.",
    )
    t.add_argument("subject", nargs="?", default="gb.>", help="subject filter (default gb.>)")
    t.add_argument("-n", "--count", type=int, default=0, help="stop after N messages")
    t.add_argument("--width", type=int, default=160, help="truncate payloads (0: never)")
    add_nats_option(t)
    t.set_defaults(func=run_tail)


def render(msg: Msg, width: int) -> str:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    hdrs = " ".join(
        f"{k}={v}" for k, v in sorted((msg.headers or {}).items()) if k.startswith("GB-")
    )
    try:
        body = json.dumps(json.loads(msg.data), separators=(",", ":")) if msg.data else ""
    except ValueError:
        body = repr(msg.data)
    if width and len(body) > width:
        body = body[: width - 1] + "…"
    return f"{stamp} {msg.subject}" + (f" [{hdrs}]" if hdrs else "") + (f" {body}" if body else "")


def run_tail(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        done = asyncio.Event()
        seen = 0

        async def on_msg(msg: Msg) -> None:
            nonlocal seen
            print(render(msg, args.width), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                done.set()

        await nc.subscribe(args.subject, cb=on_msg)
        print(f"# watching {args.subject} (Ctrl-C to stop)", flush=True)
        await done.wait()
        return 0

    return run_async(with_bus(args, work))
