"""Where a guest RPC's time goes: heartbeats one at a time, each timestamped at fourteen
points in the three processes it crosses.

This process plays the guest (a lab VM and its agent, as in ``bench/link.py``); serial-bridge
and rpc-router run as processes of their own (uvloop) with the probes of
``bench/_hop_probes.py`` installed before their ``main()``. The points of one call are lined
up by time (one monotonic clock for the whole machine) and each segment between two
consecutive points is reported as p50 and mean over the calls. Segments are either
**crossings** (a process writes, another wakes up and reads; nats-server is in between on
the NATS legs) or **code** (one process's own work).

The probes cost a few µs per point, so the total is a little above ``bench/link.py``'s
untraced figure: compare the segments with one another.

Output: ONE JSON line with every figure, then a readable table.

Usage: ``.venv/bin/python bench/link_hops.py [--count N] [--warmup N] [--keep]``
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

from bench._common import (
    Children,
    emit_json,
    interrupted,
    render_table,
    result_header,
    sigterm_as_interrupt,
    stepper,
    workdir,
)
from bench._hop_probes import install
from bench.link import start_services, wait_until
from guestbus.lab.fleet import LabFleet
from guestbus.provision import provision
from guestbus.runtime.service import run_loop

REPO = Path(__file__).resolve().parent.parent

SEGMENTS: list[tuple[str, str, str, str]] = [
    # (from, to, kind, what happens)
    ("x_start", "b_read", "crossing", "agent sends; lab relay; serial-bridge wakes and reads"),
    ("b_read", "b_fwd", "code", "bridge: decode the frame, session, start the handler task"),
    ("b_fwd", "b_pub", "code", "bridge: stamp the request, nats-py request set-up"),
    ("b_pub", "b_tcp_write", "code", "bridge: nats-py writes behind (its flusher task)"),
    ("b_tcp_write", "r_in", "crossing", "nats-server; rpc-router wakes and reads"),
    ("r_in", "r_handler", "code", "router: nats-py subscription → nats.micro → endpoint"),
    ("r_handler", "r_respond", "code", "router: the heartbeat handler"),
    ("r_respond", "r_tcp_write", "code", "router: nats-py writes behind (its flusher task)"),
    ("r_tcp_write", "b_reply_in", "crossing", "nats-server; serial-bridge wakes and reads"),
    ("b_reply_in", "b_fwd_done", "code", "bridge: nats-py reply routing, reply checks"),
    ("b_fwd_done", "b_encode", "code", "bridge: back to the link's handler"),
    ("b_encode", "x_relay_h2g", "crossing", "bridge encodes, writes; the guest side wakes"),
    ("x_relay_h2g", "x_read", "code", "lab relay passes it to the agent's serial device"),
    ("x_read", "x_end", "code", "agent: decode, match the answer, wake the caller"),
]


@dataclass
class Options:
    count: int
    warmup: int
    keep: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/link_hops.py",
        description="Where a guest RPC's time goes: per-segment timings across the processes.",
    )
    p.add_argument("--count", type=int, default=3000, help="timed heartbeats (default 3000)")
    p.add_argument("--warmup", type=int, default=300, help="untimed first calls (default 300)")
    p.add_argument("--keep", action="store_true", help="keep the logs and probe files")
    a = p.parse_args(argv)
    if a.count < 10 or a.warmup < 0:
        p.error("--count must be at least 10 and --warmup not negative")
    return Options(a.count, a.warmup, a.keep)


def probed_service(role: str, out: Path) -> list[str]:
    code = f"from bench._hop_probes import service_main; service_main({role!r}, {str(out)!r})"
    return [sys.executable, "-c", code]


async def run_calls(children: Children, url: str, tmp: Path, opts: Options) -> dict[str, Any]:
    """Start the probed services and one lab VM; return every process's points."""
    nc = await nats.connect(url, name="bench-link-hops")
    try:
        await provision(nc.jetstream(), 1)
    finally:
        await nc.close()
    sockdir = tmp / "socks"
    sockdir.mkdir(parents=True, exist_ok=True)
    outs = {role: tmp / f"points-{role}.json" for role in ("bridge", "router")}
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    role_of = {"rpc-router": "router", "serial-bridge": "bridge"}
    svc = await start_services(
        children,
        url,
        tmp,
        sockdir,
        "hops",
        {
            "GUESTBUS_LIBVIRT_URI": "",
            "GUESTBUS_SCAN_INTERVAL": "0.2",
            "GUESTBUS_RATE_LIMIT": "1000000000",
            "GUESTBUS_RATE_BURST": "1000000000",
            **env,
        },
        env,
        command=lambda service: probed_service(role_of[service], outs[role_of[service]]),
    )

    probes = install("guest")
    fleet = LabFleet(
        sockdir,
        mode="socketpair",
        agents="tasks",
        heartbeat=3600.0,
        use_pyserial=False,
        certificates=False,
    )
    try:
        vm = await fleet.add_vm(agent=False)
        await wait_until(lambda: vm.has_client, 30, "serial-bridge to connect to the lab VM")
        await fleet.start_agent(vm)
        await fleet.wait_active(timeout=30)
        link = fleet.agents[vm.uuid].link
        channel = link.channel if link is not None else None
        if channel is None:
            raise RuntimeError("the lab agent has no link")
        config_uuid = str(uuidlib.uuid4())
        for seq in range(opts.warmup + opts.count):
            params = {"seq": seq, "vm": vm.uuid, "uptime": 1.0, "config_uuid": config_uuid}
            if seq >= opts.warmup:
                probes.mark("x_start")
            await channel.request("heartbeat", params, 5.0)
            if seq >= opts.warmup:
                probes.mark("x_end")
    finally:
        await fleet.close()
        await children.stop_async(svc.bridge, svc.router)
    points = dict(probes.marks)
    for role, out in outs.items():
        try:
            points.update(json.loads(out.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{role} wrote no probe points ({exc})") from None
    return points


def segments(points: dict[str, list[float]]) -> tuple[list[dict[str, Any]], int, list[float]]:
    """Line the points of each call up: after ``x_start``, the first time of each next
    point that is not earlier than the previous one and not after ``x_end``. Calls missing a
    point are left out (counted)."""
    for times in points.values():
        times.sort()
    starts, ends = points.get("x_start", []), points.get("x_end", [])
    per: dict[tuple[str, str], list[float]] = {(a, b): [] for a, b, _, _ in SEGMENTS}
    totals: list[float] = []
    missed = 0
    for t0, t1 in zip(starts, ends, strict=True):
        row: list[tuple[tuple[str, str], float]] = []
        at = t0
        for a, b, _, _ in SEGMENTS:
            times = points.get(b, [])
            i = bisect.bisect_left(times, at)
            if i >= len(times) or times[i] > t1:
                break
            row.append(((a, b), times[i] - at))
            at = times[i]
        else:
            for key, dt in row:
                per[key].append(dt)
            totals.append(t1 - t0)
            continue
        missed += 1
    out = []
    for a, b, kind, what in SEGMENTS:
        values = per[(a, b)]
        out.append(
            {
                "from": a,
                "to": b,
                "kind": kind,
                "what": what,
                "p50_us": round(statistics.median(values) * 1e6, 1) if values else None,
                "mean_us": round(statistics.fmean(values) * 1e6, 1) if values else None,
            }
        )
    return out, missed, totals


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    step = stepper(started)
    sigterm_as_interrupt()
    result = result_header("link_hops", opts)
    with workdir("link-hops", opts.keep) as tmp:
        try:
            with Children(tmp / "logs") as children:
                broker = children.start_nats(tmp / "nats")
                step(f"{opts.count} heartbeats one at a time, probed in 3 processes")
                points = run_loop(run_calls(children, broker.url, tmp, opts), "uvloop")
                step("done")
        except KeyboardInterrupt:
            return interrupted()
        except (RuntimeError, TimeoutError) as exc:
            print(f"link_hops: {exc}", file=sys.stderr)
            return 1
    segs, missed, totals = segments(points)
    if not totals:
        print("link_hops: no call had all its points; nothing to report", file=sys.stderr)
        return 1
    by_kind = {
        kind: round(sum(s["p50_us"] or 0.0 for s in segs if s["kind"] == kind), 1)
        for kind in ("crossing", "code")
    }
    result.update(
        {
            "calls": len(totals) + missed,
            "aligned": len(totals),
            "total_p50_us": round(statistics.median(totals) * 1e6, 1),
            "segments": segs,
            "p50_sum_us": by_kind,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    )
    emit_json(result)
    print()
    print(
        f"where a guest RPC's time goes ({result['aligned']:,} of {result['calls']:,} calls "
        f"lined up; total p50 {result['total_p50_us']:,.0f} µs, probes included)"
    )
    rows: list[list[object]] = [
        [f"{s['from']} → {s['to']}", s["kind"], s["what"], s["p50_us"], s["mean_us"]] for s in segs
    ]
    rows.append(["sum of crossings", "", "", by_kind["crossing"], None])
    rows.append(["sum of code", "", "", by_kind["code"], None])
    headers = ["segment", "kind", "what happens", "p50 µs", "mean µs"]
    print(render_table(headers, rows, right=(3, 4)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
