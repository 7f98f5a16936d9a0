"""DR failover benchmark: 1,000 lab VMs re-IP'd through their agents, and a real namespace run.

Measures in one run (see docs/benchmarks.md, section "DR failover"):

1. **Scale (dry-run renderer)**: ``nats-server``, ``rpc-router``, ``serial-bridge`` and
   ``dr-orchestrator`` as separate processes (uvloop, as deployed); ``--vms`` lab VMs with
   their agents in **one** separate process (``python -m guestbus.lab.fleet --mode
   socketpair``), each agent on a simulated network (``guestbus_agent.netconf.Simulated``:
   the same verification, memory, rendering and answers as in a guest, no ``ip``). A plan
   maps 10.0.0.0/16 → 10.9.0.0/16; one failover run of every VM in one group. Figures: time
   from the start request until every VM is applied, per-VM time (link up → applied) p50 /
   p99, VMs per second, the orchestrator's CPU and memory, KV writes per VM.
2. **Peer, same run**: the link floor: one ``ping`` to each VM with the orchestrator's
   concurrency (a run needs at least two host → guest round trips per VM: ``info`` and
   ``dr_apply``), so the ratio shows what the DR bookkeeping (signing, KV records, events)
   costs over the bare link.
3. **Real re-IP** (root only): ``--netns`` VMs, each a network namespace whose agent is a
   real ``guestbus-agent`` process under ``ip netns exec``; iproute2 changes, a gateway
   check against a bridge in a "site" namespace, netplan files written. Verified with
   ``ip -j addr`` in every namespace.

Output: ONE JSON line with every figure, then a readable table.

Usage: ``.venv/bin/python bench/dr.py [--quick] [--vms N] [--netns N] [--concurrency N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
from nats.aio.client import Client

from bench._common import (
    Children,
    cpu_percent,
    cpu_snapshot,
    emit_json,
    free_port,
    interrupted,
    percentile,
    ratio,
    render_table,
    result_header,
    rss_bytes,
    service_env,
    sigterm_as_interrupt,
    stepper,
    summarize,
    wait_ready,
    workdir,
)
from guestbus.contract import KV_DR_KEYS, KV_DR_RUNS, KV_VMS, DrRunGetReply, DrRunState, dr_subject
from guestbus.drkeys import ensure_public_key
from guestbus.lab.fleet import LabFleet
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import check_reply
from guestbus.runtime.service import run_loop


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/dr.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="200 VMs, 4 namespaces: a smoke run")
    p.add_argument("--vms", type=int, help="lab VMs in the scale run (1000)")
    p.add_argument("--netns", type=int, help="VMs in the real namespace run (20; 0: skip)")
    p.add_argument("--concurrency", type=int, default=64, help="GUESTBUS_DR_CONCURRENCY (64)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    args = p.parse_args(argv)
    args.vms = args.vms or (200 if args.quick else 1000)
    args.netns = args.netns if args.netns is not None else (4 if args.quick else 20)
    return args


PLAN = {
    "mappings": [
        {
            "source": "10.0.0.0/16",
            "target": "10.9.0.0/16",
            "gateway": "10.9.0.1",
            "dns": ["10.9.0.53"],
        },
    ],
    "timeouts": {"link": 120, "apply": 60, "gateway": 10},
}


async def call(nc: Client, endpoint: str, payload: dict[str, Any], timeout: float = 60) -> Any:
    msg = await nc.request(dr_subject(endpoint), json.dumps(payload).encode(), timeout=timeout)
    return json.loads(check_reply(msg.headers, msg.data) or b"{}")


async def status(nc: Client, run: str) -> DrRunGetReply:
    first = DrRunGetReply.model_validate(await call(nc, "run.get", {"run": run}))
    vms = list(first.vms)
    while len(vms) < first.total:
        page = await call(nc, "run.get", {"run": run, "offset": len(vms)})
        vms.extend(DrRunGetReply.model_validate(page).vms)
    return DrRunGetReply(run=first.run, vms=vms, total=first.total)


async def wait_linked(nc: Client, n: int, timeout: float, exclude: set[str]) -> list[str]:
    registry = Registry(await nc.jetstream().key_value(KV_VMS))
    deadline = time.monotonic() + timeout
    while True:
        up = [
            r.uuid
            for r in await registry.all()
            if r.link.value == "serial" and r.uuid not in exclude
        ]
        if len(up) >= n:
            return up
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(up)}/{n} VMs linked after {timeout:.0f}s")
        await asyncio.sleep(1.0)


async def ping_floor(nc: Client, vms: list[str], concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors = 0

    async def one(vm: str) -> None:
        nonlocal errors
        async with sem:
            t0 = time.perf_counter()
            try:
                msg = await nc.request(f"gb.guest.{vm}.ping", b"{}", timeout=30)
                check_reply(msg.headers, msg.data)
                lat.append(time.perf_counter() - t0)
            except Exception:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(vm) for vm in vms))
    return summarize(lat, time.perf_counter() - started, errors)


async def failover(
    nc: Client,
    name: str,
    vms: list[str],
    orchestrator_pid: int,
    others: dict[str, int] | None = None,
) -> dict[str, Any]:
    plan = {"name": name, "groups": [vms], **PLAN}
    await call(nc, "plan.put", {"plan": plan})
    runs = await nc.jetstream().key_value(KV_DR_RUNS)
    writes_before = (await runs.status()).stream_info.state.messages
    pids = {"orchestrator": orchestrator_pid, **(others or {})}
    cpu0 = cpu_snapshot(pids)
    t0 = time.monotonic()
    run = (await call(nc, "run.start", {"plan": name}))["id"]
    while True:
        reply = await status(nc, run)
        if reply.run.state is not DrRunState.RUNNING:
            break
        await asyncio.sleep(0.25)
    wall = time.monotonic() - t0
    assert reply.run.finished_at is not None
    total = (reply.run.finished_at - reply.run.created_at).total_seconds()
    cpu = cpu_percent(cpu0, cpu_snapshot(pids), wall)
    per_vm = sorted(
        (v.applied_at - v.started_at).total_seconds()
        for v in reply.vms
        if v.applied_at is not None and v.started_at is not None
    )
    last_applied = max((v.applied_at for v in reply.vms if v.applied_at), default=None)
    to_all = (last_applied - reply.run.created_at).total_seconds() if last_applied else None
    writes = (await runs.status()).stream_info.state.messages - writes_before
    rss, hwm = rss_bytes(orchestrator_pid)
    failed = [f"{v.vm}: {v.reason}" for v in reply.vms if v.state.value == "failed"]
    return {
        "run": run,
        "vms": len(vms),
        "state": reply.run.state.value,
        "applied": len(per_vm),
        "failed": len(failed),
        "failed_examples": failed[:3],
        "until_all_applied_s": round(to_all, 3) if to_all is not None else None,
        "run_s": round(total, 3),
        "vms_per_s": round(len(per_vm) / to_all, 1) if to_all else None,
        "per_vm_p50_ms": round(percentile(per_vm, 50) * 1000, 1),
        "per_vm_p99_ms": round(percentile(per_vm, 99) * 1000, 1),
        "per_vm_max_ms": round(per_vm[-1] * 1000, 1) if per_vm else None,
        "orchestrator_cpu_pct": cpu.get("orchestrator"),
        "cpu_pct": cpu,
        "others_cpu_pct": cpu.get("others"),
        "orchestrator_rss_mib": round(rss / 2**20, 1),
        "orchestrator_hwm_mib": round(hwm / 2**20, 1),
        "kv_writes_per_vm": round(writes / max(1, len(vms)), 1),
    }


# --- namespaces ------------------------------------------------------------------------------


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class Namespaces:
    def __init__(self, n: int) -> None:
        self.prefix = f"gbbench{os.getpid() % 10000}"
        self.site = f"{self.prefix}-site"
        self.names = [f"{self.prefix}-{i}" for i in range(n)]

    def __enter__(self) -> Namespaces:
        sh("ip", "netns", "add", self.site)
        sh("ip", "-n", self.site, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.site, "link", "set", "br0", "up")
        sh("ip", "-n", self.site, "addr", "add", "10.9.0.1/16", "dev", "br0")
        for i, ns in enumerate(self.names):
            a, b = f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", ns, "name", "eth0")
            sh("ip", "link", "set", b, "netns", self.site)
            sh("ip", "-n", self.site, "link", "set", b, "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh(
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                f"10.0.{100 + i // 200}.{10 + i % 200}/16",
                "dev",
                "eth0",
            )
            sh("ip", "-n", ns, "route", "add", "default", "via", "10.0.0.1")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in [*self.names, self.site]:
            sh("ip", "netns", "del", ns, check=False)

    def addresses(self, ns: str) -> list[str]:
        out = []
        for link in json.loads(sh("ip", "-n", ns, "-j", "addr", "show", "dev", "eth0") or "[]"):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    out.append(f"{a['local']}/{a['prefixlen']}")
        return out


async def netns_run(
    nc: Client, n: int, sockets: Path, key: Path, tmp: Path, orchestrator_pid: int, step: Any
) -> dict[str, Any]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {"skipped": "needs root and iproute2"}
    with Namespaces(n) as spaces:
        fleet = LabFleet(sockets, mode="pty", agents="processes", heartbeat=2.0, dr_key=key)
        try:
            vms = []
            for i, ns in enumerate(spaces.names):
                root = tmp / f"guest{i}"
                (root / "etc/netplan").mkdir(parents=True)
                (root / "etc/netplan/50-cloud-init.yaml").write_text(
                    "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n"
                )
                vm = await fleet.add_vm(agent=False)
                await fleet.start_agent(
                    vm,
                    prefix=["ip", "netns", "exec", ns],
                    args=["--dr-root", str(root), "--log-level", "ERROR"],
                )
                vms.append(vm.uuid)
            step(f"real re-IP: {n} agent processes in namespaces, waiting for their links")
            registry = Registry(await nc.jetstream().key_value(KV_VMS))
            deadline = time.monotonic() + 120
            while True:
                recs = {r.uuid: r for r in await registry.all()}
                if all(recs.get(v) and recs[v].link.value == "serial" for v in vms):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("namespace agents did not link")
                await asyncio.sleep(0.5)
            step(f"real re-IP: failover of {n} VMs")
            result = await failover(nc, "bench-netns", vms, orchestrator_pid)
            moved = sum(
                1 for ns in spaces.names if any(a.startswith("10.9.") for a in spaces.addresses(ns))
            )
            result["verified_in_namespaces"] = moved
            return result
        finally:
            await fleet.close()


# --- the run ---------------------------------------------------------------------------------


async def bench(
    children: Children, tmp: Path, opts: argparse.Namespace, step: Any
) -> dict[str, Any]:
    broker = children.start_nats(tmp / "nats")
    nc = await nats.connect(broker.url, name="bench-dr")
    out: dict[str, Any] = {}
    try:
        await provision(nc.jetstream(), 1)
        key = tmp / "dr-verify.pem"
        key.write_bytes(await ensure_public_key(await nc.jetstream().key_value(KV_DR_KEYS)))
        sockets = Path(tempfile.mkdtemp(prefix="gbdrb-"))
        ports = {name: free_port() for name in ("router", "bridge", "dr")}
        procs = {
            "router": children.start(
                "rpc-router",
                [sys.executable, "-m", "guestbus_rpc_router.main"],
                service_env(broker.url, ports["router"], tmp / "router", GUESTBUS_TLS_PORT="0"),
            ),
            "bridge": children.start(
                "serial-bridge",
                [sys.executable, "-m", "guestbus_serial_bridge.main"],
                service_env(
                    broker.url,
                    ports["bridge"],
                    tmp / "bridge",
                    GUESTBUS_SOCKET_PATTERN=str(sockets / "{uuid}.serial.1"),
                    GUESTBUS_LIBVIRT_XML_DIRS="",
                    GUESTBUS_SCAN_INTERVAL="1",
                    GUESTBUS_BRIDGE_HOST="bench-host",
                ),
            ),
            "dr": children.start(
                "dr-orchestrator",
                [sys.executable, "-m", "guestbus_dr_orchestrator.main"],
                service_env(
                    broker.url,
                    ports["dr"],
                    tmp / "dr",
                    GUESTBUS_DR_CONCURRENCY=str(opts.concurrency),
                    GUESTBUS_DR_INSTANCE="bench",
                ),
            ),
        }
        for name, proc in procs.items():
            await wait_ready(ports[name], proc, what=name)
        step(f"scale: {opts.vms} lab VMs with agents in one process (simulated network)")
        fleet = children.start(
            "fleet",
            [
                sys.executable,
                "-m",
                "guestbus.lab.fleet",
                "--dir",
                str(sockets),
                "--vms",
                str(opts.vms),
                "--mode",
                "socketpair",
                "--agents",
                "tasks",
                "--heartbeat",
                "5",
                "--no-certificates",
                "--quiet",
                "--dr-key",
                str(key),
                "--dr-subnet",
                "10.0.0.0/16",
            ],
        )
        vms = await wait_linked(nc, opts.vms, 300, exclude=set())
        step(f"peer: one ping to each of {len(vms)} VMs, {opts.concurrency} in flight")
        out["ping_floor"] = await ping_floor(nc, vms, opts.concurrency)
        step(f"scale: failover of {len(vms)} VMs, concurrency {opts.concurrency}")
        others = {
            "fleet": fleet.pid,
            "bridge": procs["bridge"].pid,
            "router": procs["router"].pid,
            "nats": broker.pid or 0,
        }
        out["scale"] = await failover(nc, "bench-scale", vms, procs["dr"].pid, others)
        step(f"scale: {out['scale']['applied']} applied in {out['scale']['until_all_applied_s']} s")
        await children.stop_async(fleet)
        if opts.netns:
            out["netns"] = await netns_run(nc, opts.netns, sockets, key, tmp, procs["dr"].pid, step)
        shutil.rmtree(sockets, ignore_errors=True)
    finally:
        await nc.close()
    return out


def rows_of(result: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    headers = ["what", "scale (dry-run renderer)", "real re-IP (namespaces)"]
    s, n = result.get("scale", {}), result.get("netns", {})
    rows: list[list[object]] = [
        [
            "VMs (applied / failed)",
            f"{s.get('applied')} / {s.get('failed')}",
            f"{n.get('applied')} / {n.get('failed')}" if "applied" in n else n.get("skipped", "-"),
        ],
        ["start → all applied (s)", s.get("until_all_applied_s"), n.get("until_all_applied_s")],
        ["VMs per second", s.get("vms_per_s"), n.get("vms_per_s")],
        ["per VM, link up → applied p50 (ms)", s.get("per_vm_p50_ms"), n.get("per_vm_p50_ms")],
        ["per VM p99 (ms)", s.get("per_vm_p99_ms"), n.get("per_vm_p99_ms")],
        [
            "orchestrator CPU (% of a core)",
            s.get("orchestrator_cpu_pct"),
            n.get("orchestrator_cpu_pct"),
        ],
        [
            "CPU fleet / bridge / router / nats / others (%)",
            " / ".join(
                str(s.get("cpu_pct", {}).get(k, "-"))
                for k in ("fleet", "bridge", "router", "nats", "others")
            ),
            "-",
        ],
        [
            "orchestrator RSS / peak (MiB)",
            f"{s.get('orchestrator_rss_mib')} / {s.get('orchestrator_hwm_mib')}",
            f"{n.get('orchestrator_rss_mib')} / {n.get('orchestrator_hwm_mib')}"
            if "applied" in n
            else "-",
        ],
        ["KV writes per VM (gb_dr_runs)", s.get("kv_writes_per_vm"), n.get("kv_writes_per_vm")],
        ["verified with ip -j addr", "-", n.get("verified_in_namespaces")],
        [
            "peer: one ping per VM, same concurrency (VMs/s)",
            result.get("ping_floor", {}).get("rate"),
            "-",
        ],
        ["ratio: ping floor / DR rate", result.get("ratios", {}).get("floor_over_dr"), "-"],
    ]
    return headers, rows


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    sigterm_as_interrupt()
    started = time.monotonic()
    step = stepper(started)
    options = {"vms": opts.vms, "netns": opts.netns, "concurrency": opts.concurrency}
    result: dict[str, Any] = result_header("dr", options)
    with workdir("dr", opts.keep) as tmp:
        try:
            with Children(tmp / "logs") as children:
                result.update(run_loop(bench(children, tmp, opts, step), "uvloop"))
                step("done")
        except KeyboardInterrupt:
            return interrupted()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["ratios"] = {
        "floor_over_dr": ratio(
            result.get("ping_floor", {}).get("rate"), result.get("scale", {}).get("vms_per_s")
        )
    }
    emit_json(result)
    headers, rows = rows_of(result)
    m = result["machine"]
    print(
        f"\nDR failover benchmark {result['date']} — {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}, {m['nats_server']}\n"
    )
    print(render_table(headers, rows, right=(1, 2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
