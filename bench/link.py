"""Link benchmark: guest ↔ host round trips through the serial-bridge, their peers, a soak.

Measures in one run (see docs/benchmarks.md for how to read the output):

1. guest-initiated RPC (agent → serial → bridge → NATS → rpc-router → KV → back), one at a
   time and from many VMs at once;
2. host-initiated ping (NATS request → bridge → serial → agent → back), likewise;
3. the peers, measured again in the same run: qemu-guest-agent ``guest-ping`` on a unix
   socket (one at a time and pipelined), bare nats-py request/reply (one at a time and 256 in
   flight, on uvloop and asyncio; with the responder in another process), the guest RPC's
   path with no guestbus code (lab relay → a bare forwarder process → that responder) and
   the JetStream KV read-modify-write the router does per heartbeat;
4. ratios against the peers and PASS/FAIL against the targets;
5. a soak: many lab VMs (one separate fleet process) heartbeating through a separate
   serial-bridge process and a separate rpc-router process; every heartbeat the router
   stores is watched in the VM registry, and the bridge's peak RSS is read from /proc.

Topology of 1-2: nats-server, serial-bridge and rpc-router are separate processes (uvloop,
as deployed); the lab hypervisor (QEMU-like unix sockets) and the agents run as tasks in this
process, on uvloop: this process plays the guests.

Output: ONE JSON line with every figure, then a readable table.

Usage: ``.venv/bin/python bench/link.py [--quick] [--skip-soak] [--soak-vms N]
[--soak-seconds N]``; ``--help`` for the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
from nats.aio.client import Client

from bench._common import (
    Children,
    Samples,
    cpu_percent,
    cpu_snapshot,
    delta,
    emit_json,
    free_port,
    histogram_quantile,
    interrupted,
    markdown_table,
    metric,
    percentile,
    ratio,
    render_table,
    result_header,
    rss_bytes,
    scrape,
    service_env,
    sigterm_as_interrupt,
    stepper,
    summarize,
    verdict,
    wait_quiet,
    wait_ready,
    workdir,
)
from guestbus.contract import KV_VMS, VmRecord, guest_subject
from guestbus.lab.fleet import LabFleet
from guestbus.lab.hypervisor import LabHypervisor, LabVM
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusError
from guestbus.runtime.service import run_loop
from guestbus.wire.aio import Channel

P50_RATIO_TARGET = 2.5
"""Our p50 over bare nats-py request/reply p50 (uvloop), at most."""
BRIDGE_RSS_TARGET = 300 * 1024 * 1024
"""Peak RSS of the serial-bridge holding the soak's VMs, below."""

QGA_INSTALL = "apt-get install qemu-guest-agent (Debian/Ubuntu) or dnf install qemu-guest-agent"
T = TypeVar("T")
Call = Callable[[], Awaitable[bool]]
"""One timed operation; returns False when it got an error answer."""


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


@dataclass
class Options:
    quick: bool
    count: int  # sequential guestbus calls
    peer_count: int  # sequential nats-py calls
    qga_count: int  # sequential qemu-ga calls
    qga_pipelined: int  # pipelined qemu-ga calls
    vms: int  # VMs of the concurrent tests
    seconds: float  # duration of each concurrent test
    inflight: int  # nats-py requests in flight
    asyncio_peer: bool
    link: bool  # the round-trip tests and their peers
    soak: bool
    soak_vms: int
    soak_seconds: float
    soak_heartbeat: float
    keep: bool
    markdown: Path | None
    wait_quiet: float


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/link.py",
        description="guestbus link benchmark: guest RPC and host ping round trips through the "
        "serial-bridge, qemu-ga and nats-py peers, and a heartbeat soak.",
    )
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run (< 30 s)")
    p.add_argument("--count", type=int, help="sequential guest RPCs / host pings (3000)")
    p.add_argument("--vms", type=int, help="VMs in the concurrent tests (100)")
    p.add_argument("--seconds", type=float, help="duration of each concurrent test (10)")
    p.add_argument("--inflight", type=int, default=256, help="nats-py requests in flight (256)")
    p.add_argument("--no-asyncio", action="store_true", help="skip the asyncio nats-py peer")
    p.add_argument("--skip-soak", action="store_true", help="no soak")
    p.add_argument("--soak-only", action="store_true", help="only the soak")
    p.add_argument("--soak-vms", type=int, help="lab VMs in the soak (1000)")
    p.add_argument("--soak-seconds", type=float, help="soak window in seconds (60)")
    p.add_argument("--soak-heartbeat", type=float, help="agent heartbeat interval (5)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the machine to be idle (< 20%% of a core busy)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    a = p.parse_args(argv)
    q = a.quick
    opts = Options(
        quick=q,
        count=a.count or (300 if q else 3000),
        peer_count=500 if q else 5000,
        qga_count=2000 if q else 20000,
        qga_pipelined=10000 if q else 100000,
        vms=a.vms or (20 if q else 100),
        seconds=a.seconds or (1.5 if q else 10.0),
        inflight=a.inflight,
        asyncio_peer=not a.no_asyncio,
        link=not a.soak_only,
        soak=not a.skip_soak,
        soak_vms=a.soak_vms or (50 if q else 1000),
        soak_seconds=a.soak_seconds or (5.0 if q else 60.0),
        soak_heartbeat=a.soak_heartbeat or (1.0 if q else 5.0),
        keep=a.keep,
        markdown=a.markdown,
        wait_quiet=a.wait_quiet,
    )
    for name in ("count", "vms", "inflight", "soak_vms"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.soak_only and a.skip_soak:
        p.error("--soak-only and --skip-soak exclude each other")
    if opts.seconds <= 0 or opts.soak_seconds <= 0 or opts.soak_heartbeat <= 0:
        p.error("durations must be > 0")
    return opts


# --------------------------------------------------------------------------------------
# drivers
# --------------------------------------------------------------------------------------


async def run_sequential(
    call: Call,
    count: int,
    *,
    warmup: int = 100,
    max_seconds: float = 60.0,
    pids: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """``count`` calls one after the other (after ``warmup`` untimed ones); with ``pids``,
    the CPU use of those processes (and of the machine) during the timed calls."""
    for _ in range(warmup):
        await call()
    cpu0 = cpu_snapshot(pids or {})
    lat: list[float] = []
    errors = 0
    clock = time.perf_counter
    start = clock()
    stop_at = start + max_seconds
    for _ in range(count):
        t = clock()
        ok = await call()
        done = clock()
        if ok:
            lat.append(done - t)
        else:
            errors += 1
        if done > stop_at:
            break
    elapsed = clock() - start
    figures = summarize(lat, elapsed, errors)
    if pids is not None:
        figures["cpu_percent"] = cpu_percent(cpu0, cpu_snapshot(pids), elapsed)
    return figures


async def run_concurrent(
    calls: Sequence[Call],
    seconds: float,
    *,
    warmup: float = 0.5,
    pids: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One worker per call, each calling in a loop for ``seconds`` (after ``warmup``)."""
    clock = time.perf_counter
    lat: list[float] = []
    errors = 0
    timing = False

    async def worker(call: Call, stop_at: float) -> None:
        nonlocal errors
        while True:
            t = clock()
            if t >= stop_at:
                return
            ok = await call()
            if timing:
                if ok:
                    lat.append(clock() - t)
                else:
                    errors += 1

    if warmup > 0:
        end = clock() + warmup
        await asyncio.gather(*(worker(c, end) for c in calls))
    timing = True
    cpu0 = cpu_snapshot(pids or {})
    start = clock()
    await asyncio.gather(*(worker(c, start + seconds) for c in calls))
    elapsed = clock() - start
    figures = summarize(lat, elapsed, errors)
    figures["concurrency"] = len(calls)
    if pids is not None:
        figures["cpu_percent"] = cpu_percent(cpu0, cpu_snapshot(pids), elapsed)
    return figures


async def run_interleaved(
    calls: Mapping[str, Call], count: int, *, rounds: int = 10, warmup: int = 100
) -> dict[str, dict[str, Any]]:
    """Each call ``count`` times one at a time, in ``rounds`` alternating batches, so that
    a peer and ours see the same machine (others' load comes and goes)."""
    for call in calls.values():
        for _ in range(warmup):
            await call()
    clock = time.perf_counter
    lat: dict[str, list[float]] = {name: [] for name in calls}
    errors = dict.fromkeys(calls, 0)
    spent = dict.fromkeys(calls, 0.0)
    per_round = max(1, count // rounds)
    for _ in range(rounds):
        for name, call in calls.items():
            begin = clock()
            for _ in range(per_round):
                t = clock()
                ok = await call()
                if ok:
                    lat[name].append(clock() - t)
                else:
                    errors[name] += 1
            spent[name] += clock() - begin
    out: dict[str, dict[str, Any]] = {}
    for name in calls:
        out[name] = summarize(lat[name], spent[name], errors[name])
        out[name]["rounds"] = rounds
    return out


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------


PAYLOAD = json.dumps(
    {"seq": 1, "vm": str(uuidlib.uuid4()), "uptime": 12345.6, "config_uuid": "x" * 36}
).encode()
"""What the peers send: the size of a heartbeat's parameters."""


class EchoPeer:
    """Bare nats-py request/reply: a trivial responder and a requester, each on its own
    connection, in this process."""

    SUBJECT = "bench.echo"

    def __init__(self, url: str) -> None:
        self.url = url
        self.server: Client | None = None
        self.client: Client | None = None
        self.data = PAYLOAD

    async def start(self) -> None:
        self.server = await nats.connect(self.url, name="bench-responder")
        self.client = await nats.connect(self.url, name="bench-requester")

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await self.server.subscribe(self.SUBJECT, cb=echo)
        await self.server.flush()

    async def call(self) -> bool:
        assert self.client is not None
        await self.client.request(self.SUBJECT, self.data, timeout=5)
        return True

    async def close(self) -> None:
        for nc in (self.client, self.server):
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()


REMOTE_ECHO = """
import asyncio, sys
import nats, uvloop

async def main() -> None:
    nc = await nats.connect(sys.argv[1], name="bench-remote-responder")

    async def echo(msg):
        await msg.respond(msg.data)

    await nc.subscribe(sys.argv[2], cb=echo)
    await nc.flush()
    await asyncio.Event().wait()

uvloop.run(main())
"""
"""A trivial responder in a process of its own (uvloop): where rpc-router stands."""


class RemoteEchoPeer(EchoPeer):
    """Bare nats-py request/reply with the responder in another process, as rpc-router is
    to the serial-bridge: the same process hops as our path, none of our code."""

    SUBJECT = "bench.echo.remote"

    def __init__(self, url: str, children: Children) -> None:
        super().__init__(url)
        self.children = children

    async def start(self) -> None:
        self.children.start(
            "echo-responder", [sys.executable, "-c", REMOTE_ECHO, self.url, self.SUBJECT]
        )
        self.client = await nats.connect(self.url, name="bench-requester-remote")
        deadline = time.monotonic() + 20
        while True:
            try:
                await self.client.request(self.SUBJECT, self.data, timeout=1)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError("the remote echo responder did not come up") from None
                await asyncio.sleep(0.05)


FLOOR_FORWARDER = """
import asyncio, sys
import nats, uvloop

async def main() -> None:
    nc = await nats.connect(sys.argv[1], name="bench-floor-forwarder")
    reader, writer = await asyncio.open_unix_connection(sys.argv[2])
    while True:
        line = await reader.readline()
        if not line:
            return
        reply = await nc.request(sys.argv[3], line[:-1], timeout=5)
        writer.write(reply.data + b"\\n")

uvloop.run(main())
"""
"""The serial-bridge's job with none of its code: a line from the VM's socket becomes a
NATS request; the reply goes back down the socket."""


class FloorPeer:
    """Our guest RPC's topology with no guestbus code: a line written into a lab VM's guest
    end → the lab relay → a bare forwarder process (asyncio streams + nats-py, one request at
    a time) → NATS → :class:`RemoteEchoPeer`'s responder process → back. The same process
    crossings as agent → serial-bridge → rpc-router → back, so it is what this machine
    charges for the path itself: our framing, sessions, stamping, registry and metrics are
    the difference between it and the guest RPC."""

    def __init__(self, url: str, children: Children, sockdir: Path, subject: str) -> None:
        self.url = url
        self.children = children
        self.hypervisor = LabHypervisor(sockdir, mode="socketpair")
        self.subject = subject
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.line = PAYLOAD + b"\n"

    async def start(self) -> None:
        vm = await self.hypervisor.add_vm()
        self.reader, self.writer = await vm.open_guest()
        self.children.start(
            "floor-forwarder",
            [sys.executable, "-c", FLOOR_FORWARDER, self.url, str(vm.socket_path), self.subject],
        )
        await wait_until(lambda: vm.has_client, 20, "the floor forwarder to connect")
        deadline = time.monotonic() + 20
        while not await self.call():
            if time.monotonic() > deadline:
                raise RuntimeError("the floor forwarder does not answer")

    async def call(self) -> bool:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.line)
        try:
            reply = await asyncio.wait_for(self.reader.readline(), 5)
        except asyncio.TimeoutError:
            return False
        return reply == self.line

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        await self.hypervisor.close()


async def bare_nats(url: str, nats_pid: int, opts: Options) -> dict[str, Any]:
    """The nats-py peer on this event loop: one at a time, then ``inflight`` at once."""
    peer = EchoPeer(url)
    try:
        await peer.start()
        pids = {"bench": os.getpid(), "nats-server": nats_pid}
        seq = await run_sequential(peer.call, opts.peer_count, warmup=200, pids=pids)
        inflight = await run_concurrent([peer.call] * opts.inflight, opts.seconds, pids=pids)
        return {"sequential": seq, "inflight": inflight, "payload_bytes": len(peer.data)}
    finally:
        await peer.close()


def find_qemu_ga() -> str | None:
    found = shutil.which("qemu-ga")
    if found:
        return found
    for candidate in ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga", "/usr/local/bin/qemu-ga"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


async def qemu_ga(children: Children, tmp: Path, opts: Options) -> dict[str, Any]:
    """qemu-ga ``guest-ping`` over its unix-listen socket."""
    exe = find_qemu_ga()
    if exe is None:
        return {"installed": False, "install": QGA_INSTALL}
    probe = await asyncio.create_subprocess_exec(
        exe, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    version_text = (await probe.communicate())[0].decode(errors="replace").strip()
    work = tmp / "qemu-ga"
    (work / "state").mkdir(parents=True, exist_ok=True)
    sock = work / "qga.sock"
    argv = [exe, "-m", "unix-listen", "-p", str(sock), "-t", str(work / "state")]
    argv += ["-f", str(work / "qemu-ga.pid")]
    proc = children.start("qemu-ga", argv)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                return {
                    "installed": True,
                    "error": f"qemu-ga exited with {proc.returncode}: "
                    + children.log_tail("qemu-ga", 3),
                }
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock))
                break
            except OSError:
                if time.monotonic() > deadline:
                    return {"installed": True, "error": "qemu-ga socket did not appear"}
                await asyncio.sleep(0.02)
        request = b'{"execute":"guest-ping"}\n'

        async def call() -> bool:
            writer.write(request)
            line = await reader.readline()
            return line.startswith(b'{"return"')

        seq = await run_sequential(
            call, opts.qga_count, warmup=200, pids={"bench": os.getpid(), "qemu-ga": proc.pid}
        )

        n = opts.qga_pipelined

        async def write_all() -> None:
            batch = request * 64
            for _ in range(n // 64):
                writer.write(batch)
                await writer.drain()
            writer.write(request * (n % 64))
            await writer.drain()

        start = time.perf_counter()
        sender = asyncio.ensure_future(write_all())
        got = 0
        while got < n:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            got += chunk.count(b"\n")
        elapsed = time.perf_counter() - start
        await sender
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        pipelined = {"n": got, "seconds": round(elapsed, 3), "rate": round(got / elapsed, 1)}
        return {
            "installed": True,
            "version": (version_text.splitlines() or ["?"])[0],
            "sequential": seq,
            "pipelined": pipelined,
        }
    finally:
        await children.stop_async(proc, timeout=5)


async def kv_change(nc: Client, count: int) -> dict[str, Any]:
    """The registry read-modify-write the router does per heartbeat (KV get + CAS update),
    one at a time, on a scratch key of the real bucket."""
    js = nc.jetstream()
    kv = await js.key_value(KV_VMS)
    registry = Registry(kv)
    key = str(uuidlib.uuid4())

    def touch(rec: VmRecord) -> VmRecord:
        return rec.model_copy(update={"last_heartbeat": datetime.now(UTC)})

    async def call() -> bool:
        await registry.change(key, touch)
        return True

    try:
        return await run_sequential(call, count, warmup=50)
    finally:
        with contextlib.suppress(Exception):
            await kv.purge(key)


# --------------------------------------------------------------------------------------
# our link: bridge and router as processes, the guests here
# --------------------------------------------------------------------------------------


@dataclass
class Services:
    router: subprocess.Popen[bytes]
    bridge: subprocess.Popen[bytes]
    router_port: int
    bridge_port: int


async def start_services(
    children: Children,
    url: str,
    tmp: Path,
    sockdir: Path,
    tag: str,
    bridge_extra: dict[str, str],
    router_extra: dict[str, str] | None = None,
    command: Callable[[str], list[str]] | None = None,
) -> Services:
    """rpc-router and serial-bridge as processes, ready; ``command(service)`` is how each is
    started (default ``python -m guestbus_<service>.main``)."""
    argv = command or (
        lambda service: [sys.executable, "-m", f"guestbus_{service.replace('-', '_')}.main"]
    )
    router_port, bridge_port = free_port(), free_port()
    # the serial link only: no TLS gateway (it would wait for a cert-authority, and bind 2074)
    router_env = {"GUESTBUS_TLS_PORT": "0", **(router_extra or {})}
    router = children.start(
        f"rpc-router-{tag}",
        argv("rpc-router"),
        service_env(url, router_port, tmp / f"router-{tag}", **router_env),
    )
    bridge_env = service_env(
        url,
        bridge_port,
        tmp / f"bridge-{tag}",
        GUESTBUS_SOCKET_PATTERN=str(sockdir / "{uuid}.serial.1"),
        GUESTBUS_LIBVIRT_XML_DIRS="",
        **bridge_extra,
    )
    bridge = children.start(f"serial-bridge-{tag}", argv("serial-bridge"), bridge_env)
    try:
        await wait_ready(router_port, router, what="rpc-router")
        await wait_ready(bridge_port, bridge, what="serial-bridge")
    except RuntimeError as exc:
        tails = "\n".join(
            f"--- {n}:\n{children.log_tail(n)}"
            for n in (f"rpc-router-{tag}", f"serial-bridge-{tag}")
        )
        raise RuntimeError(f"{exc}\n{tails}") from None
    return Services(router, bridge, router_port, bridge_port)


async def scrape_both(svc: Services) -> tuple[Samples, Samples]:
    return await asyncio.gather(scrape(svc.bridge_port), scrape(svc.router_port))


def hist_mean_us(after: Samples, before: Samples, name: str, **labels: str) -> float | None:
    n = delta(after, before, f"{name}_count", **labels)
    if n <= 0:
        return None
    return round(delta(after, before, f"{name}_sum", **labels) / n * 1e6, 1)


def rpc_counts(after: Samples, before: Samples) -> dict[str, float]:
    """Guest RPCs the bridge forwarded between two scrapes, by method label."""
    counts: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "guestbus_bridge_rpc_seconds_count":
            method = dict(labels).get("method", "?")
            counts[method] = counts.get(method, 0.0) + value - before.get((name, labels), 0.0)
    return {m: c for m, c in sorted(counts.items()) if c}


def bucket_us(seconds: float | None) -> float | None:
    if seconds is None or math.isinf(seconds):
        return None
    return round(seconds * 1e6, 1)


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def link_bench(
    children: Children, url: str, nats_pid: int, tmp: Path, opts: Options
) -> dict[str, Any]:
    nc = await nats.connect(url, name="bench-link")
    fleet: LabFleet | None = None
    svc: Services | None = None
    out: dict[str, Any] = {}
    try:
        await provision(nc.jetstream(), 1)
        out["kv_change"] = await kv_change(nc, min(opts.count, 2000))

        sockdir = tmp / "link-socks"
        sockdir.mkdir(parents=True, exist_ok=True)
        # the per-VM rate limit (50 frames/s by default) would cap one VM's RPC/s: lift it
        svc = await start_services(
            children,
            url,
            tmp,
            sockdir,
            "link",
            {
                "GUESTBUS_SCAN_INTERVAL": "0.2",
                "GUESTBUS_RATE_LIMIT": "1000000000",
                "GUESTBUS_RATE_BURST": "1000000000",
            },
        )
        fleet = LabFleet(
            sockdir,
            mode="socketpair",
            agents="tasks",
            heartbeat=3600.0,
            use_pyserial=False,
            certificates=False,  # no cert-authority in this benchmark: links only
        )
        # VMs first, agents once the bridge holds every socket: a hello written before the
        # bridge connects is dropped (like QEMU) and would cost an agent its 5 s timeout
        vms: list[LabVM] = [await fleet.add_vm(agent=False) for _ in range(opts.vms)]
        await wait_until(lambda: all(vm.has_client for vm in vms), 30, "the bridge to connect")
        for vm in vms:
            await fleet.start_agent(vm)
        await fleet.wait_active(timeout=30)

        def channel_of(vm: LabVM) -> Channel:
            link = fleet.agents[vm.uuid].link if fleet is not None else None
            if link is None or link.channel is None:
                raise RuntimeError(f"agent of VM {vm.uuid} has no channel")
            return link.channel

        def rpc_call(vm: LabVM) -> Call:
            channel = channel_of(vm)
            seq = 0
            cfg_uuid = str(uuidlib.uuid4())

            async def call() -> bool:
                nonlocal seq
                seq += 1
                params = {"seq": seq, "vm": vm.uuid, "uptime": 12345.6, "config_uuid": cfg_uuid}
                try:
                    await channel.request("heartbeat", params, 5.0)
                except Exception:
                    return False
                return True

            return call

        def ping_call(vm: LabVM) -> Call:
            subject = guest_subject(vm.uuid, "ping")

            async def call() -> bool:
                try:
                    reply = await nc.request(subject, b"{}", timeout=5)
                except Exception:
                    return False
                return BusError.from_reply(reply.headers, reply.data) is None

            return call

        pids = {
            "serial-bridge": svc.bridge.pid,
            "rpc-router": svc.router.pid,
            "nats-server": nats_pid,
            "bench (guests)": os.getpid(),
        }
        services = svc

        async def measured(run: Awaitable[T]) -> tuple[T, dict[str, Any]]:
            """Run one test; also return the services' own timings (histogram means,
            warm-up included) and each process's CPU use."""
            before = await scrape_both(services)
            cpu0 = cpu_snapshot(pids)
            t = time.perf_counter()
            fig = await run
            elapsed = time.perf_counter() - t
            cpu1 = cpu_snapshot(pids)
            after = await scrape_both(services)
            stages = {
                "bridge_rpc_mean_us": hist_mean_us(
                    after[0], before[0], "guestbus_bridge_rpc_seconds", method="heartbeat"
                ),
                "router_handler_mean_us": hist_mean_us(
                    after[1], before[1], "guestbus_request_duration_seconds", endpoint="heartbeat"
                ),
                "bridge_command_mean_us": hist_mean_us(
                    after[0], before[0], "guestbus_bridge_command_seconds", method="ping"
                ),
            }
            extra = {
                "stages": {k: v for k, v in stages.items() if v is not None},
                "guest_rpcs_by_method": rpc_counts(after[0], before[0]),
                "cpu_percent": cpu_percent(cpu0, cpu1, elapsed),
            }
            return fig, extra

        peer = EchoPeer(url)
        await peer.start()
        remote = RemoteEchoPeer(url, children)
        await remote.start()
        floor = FloorPeer(url, children, tmp / "floor-socks", RemoteEchoPeer.SUBJECT)
        await floor.start()
        try:
            # one at a time: the nats-py peers, guest RPC and host ping in alternating rounds
            seq, seq_extra = await measured(
                run_interleaved(
                    {
                        "nats": peer.call,
                        "nats_remote": remote.call,
                        "floor": floor.call,
                        "guest_rpc": rpc_call(vms[0]),
                        "host_ping": ping_call(vms[0]),
                    },
                    opts.count,
                )
            )
            out["sequential_block"] = seq_extra
            # many at once
            inflight, inflight_extra = await measured(
                run_concurrent([peer.call] * opts.inflight, opts.seconds)
            )
        finally:
            await peer.close()
            await remote.close()
            await floor.close()
        out["nats_uvloop_remote"] = {"sequential": seq["nats_remote"]}
        out["floor"] = {"sequential": seq["floor"]}
        out["nats_uvloop"] = {
            "sequential": seq["nats"],
            "inflight": {**inflight, **inflight_extra},
            "payload_bytes": len(peer.data),
        }
        rpc_conc, rpc_extra = await measured(
            run_concurrent([rpc_call(vm) for vm in vms], opts.seconds)
        )
        ping_conc, ping_extra = await measured(
            run_concurrent([ping_call(vm) for vm in vms], opts.seconds)
        )
        out["guest_rpc"] = {"sequential": seq["guest_rpc"], "concurrent": {**rpc_conc, **rpc_extra}}
        out["host_ping"] = {
            "sequential": seq["host_ping"],
            "concurrent": {**ping_conc, **ping_extra},
        }
        final = await scrape_both(svc)
        out["bridge_drops"] = metric(final[0], "guestbus_bridge_bad_frames_total")
        return out
    finally:
        if fleet is not None:
            await fleet.close()
        if svc is not None:
            await children.stop_async(svc.bridge, svc.router)
        await nc.close()


# --------------------------------------------------------------------------------------
# soak
# --------------------------------------------------------------------------------------


class HeartbeatWatch:
    """Every change of every VM record, from a KV watch on the registry bucket."""

    def __init__(self) -> None:
        self.beats: dict[str, list[float]] = {}  # last_heartbeat values, in order
        self.hellos: dict[str, list[float]] = {}
        self.serial: set[str] = set()
        self.updates = 0

    def feed(self, key: str, value: bytes) -> None:
        self.updates += 1
        try:
            rec = json.loads(value)
        except ValueError:
            return
        if rec.get("link") == "serial":
            self.serial.add(key)
        else:
            self.serial.discard(key)
        for field, store in (("last_heartbeat", self.beats), ("last_hello", self.hellos)):
            stamp = rec.get(field)
            if not stamp:
                continue
            ts = datetime.fromisoformat(str(stamp)).timestamp()
            seen = store.setdefault(key, [])
            if not seen or seen[-1] != ts:
                seen.append(ts)

    def beating(self) -> int:
        """VMs whose heartbeat loop runs: a heartbeat stored after their last hello (a hello
        stamps both; the agent reports its guest info before its first heartbeat)."""
        return sum(
            1
            for key, beats in self.beats.items()
            if key in self.serial and beats[-1] > self.hellos.get(key, [0.0])[-1]
        )

    def analyse(self, vms: int, t0: float, t1: float, interval: float) -> dict[str, Any]:
        """Per VM: heartbeats stored within [t0, t1] and the longest time its
        last_heartbeat was stale (gaps between beats, and the window's edges)."""
        expected = (t1 - t0) / interval
        need = max(0, math.floor(expected) - 1)
        counts: list[int] = []
        worst_gap = 0.0
        short: list[str] = []
        stale: list[str] = []
        rehellos = 0
        for key, beats in sorted(self.beats.items()):
            inside = [b for b in beats if t0 <= b <= t1]
            before = [b for b in beats if b < t0]
            counts.append(len(inside))
            edge = before[-1] if before else t0
            points = [edge, *inside, t1]
            gap = max(b - a for a, b in zip(points, points[1:], strict=False))
            worst_gap = max(worst_gap, gap)
            if len(inside) < need:
                short.append(key)
            if gap > 2 * interval:
                stale.append(key)
            rehellos += sum(1 for h in self.hellos.get(key, []) if t0 <= h <= t1)
        missing = max(0, vms - len(self.beats))
        total = sum(counts)
        # how evenly the fleet spreads its heartbeats: stores per 1 s bin of the window;
        # and the period between a VM's consecutive heartbeats (interval + round trip)
        bins: dict[int, int] = {}
        periods: list[float] = []
        for beats in self.beats.values():
            inside = [b for b in beats if t0 <= b < t1]
            for b in inside:
                bins[int(b - t0)] = bins.get(int(b - t0), 0) + 1
            periods += [b - a for a, b in zip(inside, inside[1:], strict=False)]
        periods.sort()
        return {
            "vms_seen": len(self.beats),
            "vms_missing": missing,
            "heartbeats_stored": total,
            "expected_per_vm": round(expected, 2),
            "required_per_vm": need,
            "min_per_vm": min(counts) if counts else 0,
            "max_per_vm": max(counts) if counts else 0,
            "vms_short": len(short),
            "max_staleness_s": round(worst_gap, 2),
            "vms_stale": len(stale),
            "rehellos_in_window": rehellos,
            "stores_per_s_mean": round(total / (t1 - t0), 1) if t1 > t0 else None,
            "stores_per_s_peak": max(bins.values()) if bins else 0,
            "period_mean_s": round(sum(periods) / len(periods), 3) if periods else None,
            "period_p50_s": round(percentile(periods, 50), 3) if periods else None,
            "period_p99_s": round(percentile(periods, 99), 3) if periods else None,
            "examples_short": short[:3],
            "examples_stale": stale[:3],
        }


async def soak(children: Children, tmp: Path, opts: Options) -> dict[str, Any]:
    """N lab VMs (one fleet process) heartbeating through a bridge process for a while."""
    broker = children.start_nats(tmp / "soak-nats")
    url = broker.url
    nc = await nats.connect(url, name="bench-soak")
    procs: list[subprocess.Popen[bytes]] = []
    watch = HeartbeatWatch()
    watcher: Any = None
    watch_task: asyncio.Task[None] | None = None
    interval = opts.soak_heartbeat
    try:
        await provision(nc.jetstream(), 1)
        kv = await nc.jetstream().key_value(KV_VMS)
        watcher = await kv.watchall(include_history=False)

        async def follow() -> None:
            async for entry in watcher:
                if entry is not None and entry.value:
                    watch.feed(entry.key, entry.value)

        watch_task = asyncio.ensure_future(follow())

        sockdir = tmp / "soak-socks"
        sockdir.mkdir(parents=True, exist_ok=True)
        svc = await start_services(
            children,
            url,
            tmp,
            sockdir,
            "soak",
            {"GUESTBUS_SCAN_INTERVAL": "1"},
            {"GUESTBUS_HEARTBEAT_INTERVAL": str(interval)},
        )
        procs += [svc.bridge, svc.router]
        rss_idle, _ = rss_bytes(svc.bridge.pid)
        rss_peak_sampled = rss_idle

        def sample_rss() -> None:
            nonlocal rss_peak_sampled
            with contextlib.suppress(OSError):
                rss_peak_sampled = max(rss_peak_sampled, rss_bytes(svc.bridge.pid)[0])

        started = time.monotonic()
        fleet = children.start(
            "lab-fleet",
            [
                sys.executable,
                "-m",
                "guestbus.lab.fleet",
                "--dir",
                str(sockdir),
                "--mode",
                "socketpair",
                "--agents",
                "tasks",
                "--vms",
                str(opts.soak_vms),
                "--heartbeat",
                str(interval),
                "--no-certificates",  # no cert-authority here: links only
            ],
            {"PYTHONUNBUFFERED": "1"},
        )
        procs.append(fleet)

        # warm-up: every VM's link up (bridge), registered over serial (router), and
        # heartbeating (a heartbeat after its hello)
        warm_timeout = 60.0 + opts.soak_vms * 0.1
        up = 0.0
        beating = 0
        while True:
            sample_rss()
            for p, name in ((fleet, "lab-fleet"), (svc.bridge, "serial-bridge-soak")):
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited: {children.log_tail(name)}")
            with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
                up = metric(await scrape(svc.bridge_port), "guestbus_bridge_links", state="up")
            beating = watch.beating()
            if up >= opts.soak_vms and beating >= opts.soak_vms:
                break
            if time.monotonic() - started > warm_timeout:
                raise RuntimeError(
                    f"soak warm-up: {up:.0f}/{opts.soak_vms} links up, "
                    f"{len(watch.serial)} registered, {beating} heartbeating "
                    f"after {warm_timeout:.0f}s"
                )
            await asyncio.sleep(0.5)
        warmup_s = time.monotonic() - started
        rss_loaded, _ = rss_bytes(svc.bridge.pid)

        # the window
        pids = {
            "serial-bridge": svc.bridge.pid,
            "rpc-router": svc.router.pid,
            "lab-fleet": fleet.pid,
            "nats-server": broker.pid or 0,
        }
        cpu0 = cpu_snapshot(pids)
        b0, r0 = await scrape_both(svc)
        t0 = time.time()
        end = time.monotonic() + opts.soak_seconds
        rss_series: list[int] = []
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            sample_rss()
            with contextlib.suppress(OSError):
                rss_series.append(rss_bytes(svc.bridge.pid)[0])
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a soak process exited early (pid {p.pid})")
        t1 = time.time()
        b1, r1 = await scrape_both(svc)
        cpu1 = cpu_snapshot(pids)
        rss_end, rss_hwm = rss_bytes(svc.bridge.pid)
        await asyncio.sleep(0.3)  # let the watch catch up with the last stores

        window = t1 - t0
        handled = delta(r1, r0, "guestbus_guest_rpcs_total", method="heartbeat")
        bridge_total = delta(b1, b0, "guestbus_bridge_rpc_seconds_count", method="heartbeat")
        bridge_ok = delta(
            b1, b0, "guestbus_bridge_rpc_seconds_count", method="heartbeat", outcome="ok"
        )
        analysis = watch.analyse(opts.soak_vms, t0, t1, interval)
        expected_total = opts.soak_vms * window / interval
        peak = max(rss_hwm, rss_peak_sampled)
        return {
            "vms": opts.soak_vms,
            "heartbeat_s": interval,
            "window_s": round(window, 2),
            "warmup_s": round(warmup_s, 1),
            "router_heartbeats": handled,
            "expected_heartbeats": round(expected_total),
            "handled_ratio": ratio(handled, expected_total, 3),
            "bridge_heartbeats_failed": bridge_total - bridge_ok,
            "bridge_rpc_mean_us": hist_mean_us(
                b1, b0, "guestbus_bridge_rpc_seconds", method="heartbeat"
            ),
            "bridge_rpc_p99_le_us": bucket_us(
                histogram_quantile(b1, b0, "guestbus_bridge_rpc_seconds", 0.99, method="heartbeat")
            ),
            "router_handler_mean_us": hist_mean_us(
                r1, r0, "guestbus_request_duration_seconds", endpoint="heartbeat"
            ),
            "bridge_drops": delta(b1, b0, "guestbus_bridge_bad_frames_total"),
            "guest_rpcs_by_method": rpc_counts(b1, b0),
            "registry": analysis,
            "bridge_rss_idle_mb": round(rss_idle / 2**20, 1),
            "bridge_rss_loaded_mb": round(rss_loaded / 2**20, 1),
            "bridge_rss_end_mb": round(rss_end / 2**20, 1),
            "bridge_rss_peak_mb": round(peak / 2**20, 1),
            "bridge_kb_per_vm": round((rss_end - rss_idle) / opts.soak_vms / 1024, 1),
            "cpu_percent": cpu_percent(cpu0, cpu1, window),
        }
    finally:
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()
        if watch_task is not None:
            watch_task.cancel()
            await asyncio.gather(watch_task, return_exceptions=True)
        await nc.close()
        await children.stop_async(*procs)
        await broker.stop()


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def g(d: dict[str, Any] | None, *path: str) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def compute_ratios(r: dict[str, Any]) -> dict[str, Any]:
    nats_uv = g(r, "peers", "nats", "uvloop")
    qga = g(r, "peers", "qemu_ga")
    out: dict[str, Any] = {}
    for ours in ("guest_rpc", "host_ping"):
        seq = g(r, ours, "sequential")
        conc = g(r, ours, "concurrent")
        out[ours] = {
            "p50_vs_nats": ratio(g(seq, "p50_us"), g(nats_uv, "sequential", "p50_us")),
            "p50_vs_nats_remote": ratio(
                g(seq, "p50_us"), g(r, "peers", "nats", "uvloop_remote", "sequential", "p50_us")
            ),
            "p50_vs_floor": ratio(g(seq, "p50_us"), g(r, "peers", "floor", "sequential", "p50_us")),
            "p99_vs_nats": ratio(g(seq, "p99_us"), g(nats_uv, "sequential", "p99_us")),
            "rate_vs_nats": ratio(g(seq, "rate"), g(nats_uv, "sequential", "rate")),
            "concurrent_rate_vs_nats_inflight": ratio(
                g(conc, "rate"), g(nats_uv, "inflight", "rate")
            ),
            "p50_vs_qemu_ga": ratio(g(seq, "p50_us"), g(qga, "sequential", "p50_us")),
            "rate_vs_qemu_ga": ratio(g(seq, "rate"), g(qga, "sequential", "rate")),
            "concurrent_rate_vs_qemu_ga_pipelined": ratio(
                g(conc, "rate"), g(qga, "pipelined", "rate")
            ),
        }
    out["floor"] = {
        "p50_vs_nats": ratio(
            g(r, "peers", "floor", "sequential", "p50_us"), g(nats_uv, "sequential", "p50_us")
        )
    }
    return out


def compute_targets(r: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    for ours in ("guest_rpc", "host_ping"):
        value = g(r, "ratios", ours, "p50_vs_nats")
        t[f"{ours}_p50_vs_nats"] = {
            "value": value,
            "target": f"<= {P50_RATIO_TARGET}x",
            "pass": None if value is None else value <= P50_RATIO_TARGET,
        }
    s = r.get("soak")
    if isinstance(s, dict) and "error" in s:
        t["soak"] = {"value": s["error"], "target": "completes", "pass": False}
    elif isinstance(s, dict) and "registry" in s:
        reg = s["registry"]
        missed = reg["vms_short"] + reg["vms_stale"] + reg["vms_missing"]
        t["soak_no_missed_heartbeat"] = {
            "value": f"{missed} VMs short/stale/missing",
            "target": "0",
            "pass": missed == 0 and s["bridge_heartbeats_failed"] == 0,
        }
        t["soak_bridge_peak_rss"] = {
            "value": s["bridge_rss_peak_mb"],
            "target": f"< {BRIDGE_RSS_TARGET // 2**20} MB",
            "pass": s["bridge_rss_peak_mb"] * 2**20 < BRIDGE_RSS_TARGET,
        }
    return t


TESTS: list[tuple[tuple[str, ...], str]] = [
    (("guest_rpc", "sequential"), "guest RPC heartbeat, one at a time"),
    (("guest_rpc", "concurrent"), "guest RPC heartbeat, {vms} VMs at once"),
    (("host_ping", "sequential"), "host ping (NATS → guest), one at a time"),
    (("host_ping", "concurrent"), "host ping, {vms} VMs at once"),
]
PROCS = ("serial-bridge", "rpc-router", "nats-server", "bench (guests)", "others")


def perf_row(label: str, fig: dict[str, Any] | None, note: str = "") -> list[object]:
    if not fig:
        return [label, None, None, None, None, note or "not measured"]
    return [label, fig.get("rate"), fig.get("p50_us"), fig.get("p99_us"), fig.get("n"), note]


def us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def report_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    """The figures table (also written to docs/benchmarks.md)."""
    o = r["options"]
    rows: list[list[object]] = [["guestbus (bridge + router as processes, uvloop)"]]
    for key, label in TESTS:
        fig = g(r, *key)
        errors = g(fig, "errors")
        rows.append(perf_row(label.format(vms=o["vms"]), fig, f"{errors} errors" if errors else ""))
    rows.append(["peers (same run)"])
    qga = g(r, "peers", "qemu_ga") or {}
    if not qga.get("installed"):
        rows.append(["qemu-ga guest-ping", None, None, None, None, f"not installed: {QGA_INSTALL}"])
    elif "error" in qga:
        rows.append(["qemu-ga guest-ping", None, None, None, None, f"failed: {qga['error']}"])
    else:
        rows.append(perf_row("qemu-ga guest-ping, one at a time", qga.get("sequential")))
        rows.append(perf_row("qemu-ga guest-ping, pipelined", qga.get("pipelined")))
    remote = g(r, "peers", "nats", "uvloop_remote", "sequential")
    if remote is not None:
        rows.append(
            perf_row("nats-py request/reply, responder in another process (uvloop)", remote)
        )
    floor = g(r, "peers", "floor", "sequential")
    if floor is not None:
        rows.append(
            perf_row(
                "guest RPC's path with no guestbus code (relay → forwarder → responder)", floor
            )
        )
    for loop in ("uvloop", "asyncio"):
        peer = g(r, "peers", "nats", loop)
        if peer is None:
            continue
        rows.append(perf_row(f"nats-py request/reply, one at a time ({loop})", peer["sequential"]))
        rows.append(
            perf_row(f"nats-py request/reply, {o['inflight']} in flight ({loop})", peer["inflight"])
        )
    rows.append(
        perf_row(
            "JetStream KV get + CAS update (router's per-heartbeat store)",
            g(r, "peers", "kv_change"),
        )
    )
    return ["what", "rate/s", "p50 µs", "p99 µs", "n", "note"], rows


def stage_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    """Where the time goes: the services' own histogram means and each process's CPU."""
    vms, inflight = r["options"]["vms"], r["options"]["inflight"]
    blocks = [
        (r.get("sequential_block"), "one at a time (nats-py, guest RPC, ping interleaved)"),
        (g(r, "peers", "nats", "uvloop", "inflight"), f"nats-py, {inflight} in flight"),
        (g(r, "guest_rpc", "concurrent"), f"guest RPC heartbeat, {vms} VMs at once"),
        (g(r, "host_ping", "concurrent"), f"host ping, {vms} VMs at once"),
    ]
    rows: list[list[object]] = []
    for fig, label in blocks:
        if not fig:
            continue
        st = fig.get("stages") or {}
        cpu = fig.get("cpu_percent") or {}
        rows.append(
            [
                label,
                st.get("bridge_rpc_mean_us"),
                st.get("router_handler_mean_us"),
                st.get("bridge_command_mean_us"),
            ]
            + [cpu.get(p) for p in PROCS]
        )
    headers = ["test", "bridge→router→bridge µs", "router handler µs", "bridge→guest→bridge µs"]
    return headers + [f"CPU% {p}" for p in PROCS], rows


def ratio_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    rows: list[list[object]] = []
    ra = r.get("ratios") or {}
    tg = r.get("targets") or {}
    for ours, label in (("guest_rpc", "guest RPC"), ("host_ping", "host ping")):
        q = ra.get(ours) or {}
        t = tg.get(f"{ours}_p50_vs_nats") or {}
        rows.append(
            [
                f"{label} p50 / nats-py p50 (uvloop)",
                x(q.get("p50_vs_nats")),
                t.get("target", ""),
                verdict(t.get("pass")),
            ]
        )
        rows.append(
            [
                f"{label} p50 / nats-py p50, responder in another process (uvloop)",
                x(q.get("p50_vs_nats_remote")),
                "",
                "",
            ]
        )
        if ours == "guest_rpc":
            rows.append(
                [
                    f"{label} p50 / the same path with no guestbus code",
                    x(q.get("p50_vs_floor")),
                    "",
                    "",
                ]
            )
        rows.append([f"{label} p99 / nats-py p99", x(q.get("p99_vs_nats")), "", ""])
        rows.append(
            [f"{label} rate / nats-py rate, one at a time", x(q.get("rate_vs_nats")), "", ""]
        )
        rows.append(
            [
                f"{label} rate, many VMs / nats-py rate, in flight",
                x(q.get("concurrent_rate_vs_nats_inflight")),
                "",
                "",
            ]
        )
        rows.append([f"{label} p50 / qemu-ga p50", x(q.get("p50_vs_qemu_ga")), "", ""])
        rows.append(
            [f"{label} rate / qemu-ga rate, one at a time", x(q.get("rate_vs_qemu_ga")), "", ""]
        )
        rows.append(
            [
                f"{label} rate, many VMs / qemu-ga pipelined",
                x(q.get("concurrent_rate_vs_qemu_ga_pipelined")),
                "",
                "",
            ]
        )
    rows.append(
        [
            "the same path with no guestbus code p50 / nats-py p50 (uvloop)",
            x(g(ra, "floor", "p50_vs_nats")),
            "",
            "",
        ]
    )
    return ["ratio", "value", "target", "verdict"], rows


def soak_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    s = r.get("soak")
    if not isinstance(s, dict):
        return ["soak", "value", "target", "verdict"], [["soak", "skipped", "", ""]]
    tg = r.get("targets") or {}
    if "error" in s:
        return ["soak", "value", "target", "verdict"], [["soak", s["error"], "", "FAIL"]]
    reg = s["registry"]
    miss = tg.get("soak_no_missed_heartbeat") or {}
    rss = tg.get("soak_bridge_peak_rss") or {}
    cpu = s.get("cpu_percent") or {}
    rows: list[list[object]] = [
        [
            "VMs x heartbeat interval x window",
            f"{s['vms']} x {s['heartbeat_s']} s x {s['window_s']} s (warm-up {s['warmup_s']} s)",
            "",
            "",
        ],
        [
            "heartbeats: router handled / stored in registry / nominal (VMs x window / interval)",
            f"{s['router_heartbeats']:,.0f} / {reg['heartbeats_stored']:,} / "
            f"{s['expected_heartbeats']:,}",
            "",
            "",
        ],
        [
            "heartbeats per VM stored in the registry (min / max)",
            f"{reg['min_per_vm']} / {reg['max_per_vm']} (expected {reg['expected_per_vm']}, "
            f"need >= {reg['required_per_vm']})",
            "",
            "",
        ],
        [
            "VMs short of heartbeats / stale > 2 intervals / never seen",
            f"{reg['vms_short']} / {reg['vms_stale']} / {reg['vms_missing']}; "
            f"bridge-side failures {s['bridge_heartbeats_failed']:.0f}",
            miss.get("target", ""),
            verdict(miss.get("pass")),
        ],
        ["longest staleness of any VM's last_heartbeat", f"{reg['max_staleness_s']} s", "", ""],
        [
            "heartbeat period per VM: mean / p50 / p99",
            f"{reg['period_mean_s']} / {reg['period_p50_s']} / {reg['period_p99_s']} s",
            "",
            "",
        ],
        [
            "heartbeats stored per second: mean / busiest second",
            f"{reg['stores_per_s_mean']} / {reg['stores_per_s_peak']}",
            "",
            "",
        ],
        [
            "bridge RSS idle / loaded / peak",
            f"{s['bridge_rss_idle_mb']} / {s['bridge_rss_loaded_mb']} / "
            f"{s['bridge_rss_peak_mb']} MB ({s['bridge_kb_per_vm']} KB per VM)",
            rss.get("target", ""),
            verdict(rss.get("pass")),
        ],
        [
            "heartbeat: bridge round trip mean / p99 (bucket) / router handler mean",
            f"{us(s['bridge_rpc_mean_us'])} / <= {us(s['bridge_rpc_p99_le_us'])} / "
            f"{us(s['router_handler_mean_us'])} µs",
            "",
            "",
        ],
        [
            "guest RPCs through the bridge in the window, by method",
            ", ".join(f"{m} {c:,.0f}" for m, c in (s.get("guest_rpcs_by_method") or {}).items()),
            "",
            "",
        ],
        [
            "CPU % of one core (bridge, router, fleet, nats-server, others)",
            ", ".join(
                f"{cpu.get(k, '-')}"
                for k in ("serial-bridge", "rpc-router", "lab-fleet", "nats-server", "others")
            ),
            "",
            "",
        ],
    ]
    return ["soak", "value", "target", "verdict"], rows


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print()
    print(
        f"guestbus link benchmark, {r['date']}: {m['cores']} cores, {m['cpu']}, "
        f"Python {m['python']}, {m['loop']}"
    )
    for headers, rows, right in (
        (*report_rows(r), (1, 2, 3, 4)),
        (*stage_rows(r), tuple(range(1, 4 + len(PROCS)))),
        (*ratio_rows(r), ()),
        (*soak_rows(r), ()),
    ):
        print()
        print(render_table(headers, rows, right=right))
    failed = [k for k, v in (r.get("targets") or {}).items() if v.get("pass") is False]
    print()
    print("targets: " + ("all PASS" if not failed else "FAIL: " + ", ".join(failed)))


def markdown(r: dict[str, Any]) -> str:
    """The tables as Markdown (for docs/benchmarks.md)."""
    parts = []
    for headers, rows in (report_rows(r), stage_rows(r), ratio_rows(r), soak_rows(r)):
        parts.append(markdown_table(headers, rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # the lab agents log every link they lose when the fleet closes: errors only
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    sigterm_as_interrupt()
    result: dict[str, Any] = {**result_header("link", opts), "peers": {"nats": {}}}
    started = time.monotonic()
    step = stepper(started)
    with workdir("link", opts.keep) as tmp:
        try:
            result["machine"]["busy_before_pct"] = wait_quiet(opts.wait_quiet, "benchmark")
            result["machine"]["loadavg"] = os.getloadavg()
            with Children(tmp / "logs") as children:
                if opts.link:
                    broker = children.start_nats(tmp / "nats")
                    url = broker.url
                    if opts.asyncio_peer:  # the uvloop peer is measured with ours, interleaved
                        step("peer: nats-py request/reply (asyncio)")
                        result["peers"]["nats"]["asyncio"] = run_loop(
                            bare_nats(url, broker.pid or 0, opts), "asyncio"
                        )
                    step("peer: qemu-ga guest-ping")
                    result["peers"]["qemu_ga"] = run_loop(qemu_ga(children, tmp, opts), "uvloop")
                    step(
                        f"guestbus: guest RPC and host ping ({opts.vms} VMs), interleaved with "
                        "the nats-py peers (uvloop)"
                    )
                    ours = run_loop(link_bench(children, url, broker.pid or 0, tmp, opts), "uvloop")
                    result["peers"]["kv_change"] = ours.pop("kv_change")
                    result["peers"]["nats"]["uvloop"] = ours.pop("nats_uvloop")
                    result["peers"]["nats"]["uvloop_remote"] = ours.pop("nats_uvloop_remote")
                    result["peers"]["floor"] = ours.pop("floor")
                    result.update(ours)
                    broker.stop_sync()
                if opts.soak:
                    step(
                        f"soak: {opts.soak_vms} VMs, heartbeat {opts.soak_heartbeat:g}s, "
                        f"{opts.soak_seconds:g}s"
                    )
                    try:
                        result["soak"] = run_loop(soak(children, tmp, opts), "uvloop")
                    except (RuntimeError, TimeoutError) as exc:
                        result["soak"] = {"error": str(exc)}
                step("done")
        except KeyboardInterrupt:
            return interrupted()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["ratios"] = compute_ratios(result)
    result["targets"] = compute_targets(result)
    emit_json(result)
    print_report(result)
    if opts.markdown is not None:
        opts.markdown.write_text(markdown(result) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
