"""Certificate-authority benchmark: certificates issued through the bus, their peers, a
renewal storm.

Measures in one run (see docs/benchmarks.md, section "Certificate authority"):

1. guestbus: CSR in, certificate out through NATS (``gb.ca.issue``) against the
   cert-authority running as its own process (uvloop, as deployed) and a real nats-server:
   one request at a time (latency) and many in flight (throughput; these certificates become
   the storm's fleet);
2. the peers, in the same run and with the same key type (EC P-256 CA and CSRs):
   ``openssl x509 -req`` as a subprocess per certificate (CSR verified, same extensions),
   and in-process ``cryptography`` (parse + verify the CSR, sign; the CA's own code, no bus,
   no KV);
3. a renewal storm: a fleet of VMs enrolled at once renews at 2/3 of the lifetime with a
   random jitter of ±5 % of the lifetime, so all renewals fall in a window of 10 % of the
   lifetime (9 days for 90-day certificates). The window is compressed into a few seconds
   (the factor is printed) and each VM's renewal is sent at its scheduled moment
   (open loop): peak renewals per second and the CA's p99 latency, client side and from the
   service's histogram. For contrast the same fleet then renews with no jitter at all;
4. ``gb.ca.list`` over every record (one KV watch).

CSRs are generated before the clock starts (key generation is the guest's cost).

Output: ONE JSON line with every figure, then a readable table with ratios.

Usage: ``.venv/bin/python bench/ca.py [--quick] [--vms N] [--window S]``; ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography
import nats
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client

from bench._common import (
    Children,
    cpu_percent,
    cpu_snapshot,
    emit_json,
    free_port,
    histogram_quantile,
    interrupted,
    markdown_table,
    metric,
    ratio,
    render_table,
    result_header,
    scrape,
    service_env,
    sigterm_as_interrupt,
    stepper,
    summarize,
    wait_quiet,
    wait_ready,
    workdir,
)
from guestbus import pki
from guestbus.contract import CertReply, ca_subject
from guestbus.provision import provision
from guestbus.runtime import check_reply
from guestbus.runtime.service import run_loop
from guestbus_cert_authority.authority import (
    BACKDATE,
    CaMaterial,
    build_ca_certificate,
    build_vm_certificate,
)

TRUST_DOMAIN = "guestbus.local"
LIFETIME_DAYS = 90
RENEW_AT = 2 / 3
JITTER = 0.05
"""± this fraction of the lifetime around the renewal point."""
REFERENCE = {"cryptography_per_s": 5000.0, "openssl_per_s": 36.0}
"""docs/DESIGN reference figures (same machine kind) — for context; ratios use this run."""


@dataclass
class Options:
    quick: bool
    sequential: int
    vms: int
    inflight: int
    openssl: int
    inprocess: int
    window: float
    keep: bool
    markdown: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/ca.py",
        description="guestbus cert-authority benchmark: issuance through the bus vs openssl "
        "and in-process cryptography, and a jittered renewal storm.",
    )
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--sequential", type=int, help="one-at-a-time issues (1000)")
    p.add_argument("--vms", type=int, help="fleet size: concurrent issues and storm (10000)")
    p.add_argument("--inflight", type=int, default=64, help="requests in flight (64)")
    p.add_argument("--openssl", type=int, help="openssl x509 -req runs (100)")
    p.add_argument("--inprocess", type=int, help="in-process cryptography signings (5000)")
    p.add_argument("--window", type=float, help="seconds the jitter window is compressed into (20)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    a = p.parse_args(argv)
    q = a.quick
    opts = Options(
        quick=q,
        sequential=a.sequential or (200 if q else 1000),
        vms=a.vms or (2000 if q else 10000),
        inflight=a.inflight,
        openssl=a.openssl or (20 if q else 100),
        inprocess=a.inprocess or (500 if q else 5000),
        window=a.window or (4.0 if q else 20.0),
        keep=a.keep,
        markdown=a.markdown,
    )
    for name in ("sequential", "vms", "inflight", "openssl", "inprocess"):
        if getattr(opts, name) < 1:
            p.error(f"--{name} must be >= 1")
    if opts.window <= 0:
        p.error("--window must be > 0")
    return opts


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@dataclass
class Fleet:
    vms: list[str]
    csrs: list[str]


def make_fleet(n: int) -> Fleet:
    vms = [str(uuidlib.uuid4()) for _ in range(n)]
    csrs = [pki.make_csr(ec.generate_private_key(ec.SECP256R1()), vm).decode() for vm in vms]
    return Fleet(vms, csrs)


def issue_body(vm: str, csr: str) -> bytes:
    return json.dumps({"csr": csr, "vm": vm}).encode()


# --------------------------------------------------------------------------------------
# guestbus through the bus
# --------------------------------------------------------------------------------------


async def bus_call(nc: Client, subject: str, body: bytes) -> CertReply:
    msg = await nc.request(subject, body, timeout=30)
    return CertReply.model_validate_json(check_reply(msg.headers, msg.data))


async def sequential(nc: Client, fleet: Fleet) -> dict[str, Any]:
    subject = ca_subject("issue")
    lat: list[float] = []
    started = time.perf_counter()
    for vm, csr in zip(fleet.vms, fleet.csrs, strict=True):
        t0 = time.perf_counter()
        await bus_call(nc, subject, issue_body(vm, csr))
        lat.append(time.perf_counter() - t0)
    return summarize(lat, time.perf_counter() - started)


async def concurrent(nc: Client, fleet: Fleet, inflight: int, endpoint: str) -> dict[str, Any]:
    subject = ca_subject(endpoint)
    sem = asyncio.Semaphore(inflight)
    lat: list[float] = []
    errors = 0

    async def one(vm: str, csr: str) -> None:
        nonlocal errors
        async with sem:
            t0 = time.perf_counter()
            try:
                await bus_call(nc, subject, issue_body(vm, csr))
            except Exception:
                errors += 1
                return
            lat.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one(v, c) for v, c in zip(fleet.vms, fleet.csrs, strict=True)))
    out = summarize(lat, time.perf_counter() - started, errors)
    out["inflight"] = inflight
    return out


async def storm(
    nc: Client, fleet: Fleet, window: float, inflight_cap: int | None = None
) -> dict[str, Any]:
    """Each VM renews at its own moment in [0, window) (open loop); window 0 = all at once
    (then at most ``inflight_cap`` in flight)."""
    subject = ca_subject("renew")
    n = len(fleet.vms)
    offsets = sorted(random.uniform(0, window) for _ in range(n)) if window > 0 else [0.0] * n
    order = list(range(n))
    random.shuffle(order)
    lat: list[float] = []
    done_at: list[float] = []
    errors = 0
    unlinked = 0
    sem = asyncio.Semaphore(inflight_cap) if inflight_cap else None
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2

    async def one(i: int, offset: float) -> None:
        nonlocal errors, unlinked
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            await sem.acquire()
        t0 = time.perf_counter()
        try:
            reply = await bus_call(nc, subject, issue_body(fleet.vms[i], fleet.csrs[i]))
        except Exception:
            errors += 1
            return
        finally:
            if sem is not None:
                sem.release()
        lat.append(time.perf_counter() - t0)
        done_at.append(loop.time() - start)
        if reply.renewal_of is None:
            unlinked += 1

    t_start = time.perf_counter()
    await asyncio.gather(*(one(i, off) for i, off in zip(order, offsets, strict=True)))
    elapsed = time.perf_counter() - t_start - 0.2
    out = summarize(lat, max(elapsed, 1e-9), errors)
    buckets: dict[int, int] = {}
    for t in done_at:
        buckets[int(t)] = buckets.get(int(t), 0) + 1
    out["peak_per_s"] = max(buckets.values()) if buckets else 0
    out["offered_per_s"] = round(n / window, 1) if window > 0 else None
    out["window_s"] = window
    out["unlinked_renewals"] = unlinked
    return out


async def list_all(nc: Client) -> dict[str, Any]:
    t0 = time.perf_counter()
    msg = await nc.request(ca_subject("list"), b'{"limit": 1000}', timeout=120)
    body = json.loads(check_reply(msg.headers, msg.data))
    return {"records": body["total"], "ms": round((time.perf_counter() - t0) * 1000, 1)}


async def bus_bench(children: Children, tmp: Path, opts: Options, step: Any) -> dict[str, Any]:
    broker = children.start_nats(tmp / "nats")
    setup = await nats.connect(broker.url)
    await provision(setup.jetstream(), 1)
    await setup.close()
    port = free_port()
    env = service_env(
        broker.url,
        port,
        tmp / "ca-state",
        GUESTBUS_CA_PASSPHRASE="bench-passphrase",
        GUESTBUS_CA_SCAN_INTERVAL="3600",
        GUESTBUS_TRUST_DOMAIN=TRUST_DOMAIN,
    )
    ca_proc = children.start(
        "cert-authority", [sys.executable, "-m", "guestbus_cert_authority.main"], env
    )
    await wait_ready(port, ca_proc, what="cert-authority")
    pids = {"cert_authority": ca_proc.pid, "nats_server": broker.pid or 0}
    out: dict[str, Any] = {}
    nc = await nats.connect(broker.url, name="bench-ca")
    try:
        step(f"CSRs for {opts.sequential + opts.vms} VMs")
        seq_fleet = make_fleet(opts.sequential)
        fleet = make_fleet(opts.vms)
        # warm-up (imports, JIT-less caches, first KV writes)
        await concurrent(nc, make_fleet(50), 16, "issue")

        step(f"bus: {opts.sequential} issues one at a time")
        out["sequential"] = await sequential(nc, seq_fleet)

        step(f"bus: {opts.vms} issues, {opts.inflight} in flight (the storm's fleet)")
        before_cpu = cpu_snapshot(pids)
        t0 = time.perf_counter()
        out["concurrent"] = await concurrent(nc, fleet, opts.inflight, "issue")
        out["concurrent"]["cpu_pct"] = cpu_percent(
            before_cpu, cpu_snapshot(pids), time.perf_counter() - t0
        )

        window_real = LIFETIME_DAYS * 86400 * 2 * JITTER
        step(
            f"storm: {opts.vms} renewals, ±{JITTER:.0%} jitter of {LIFETIME_DAYS} d = "
            f"{window_real / 86400:.0f}-day window compressed into {opts.window:g} s"
        )
        before = await scrape(port)
        before_cpu = cpu_snapshot(pids)
        t0 = time.perf_counter()
        jittered = await storm(nc, fleet, opts.window)
        jittered["cpu_pct"] = cpu_percent(before_cpu, cpu_snapshot(pids), time.perf_counter() - t0)
        after = await scrape(port)
        jittered["server_p99_le_s"] = histogram_quantile(
            after, before, "guestbus_certificate_issue_duration_seconds", 0.99, kind="vm"
        )
        jittered["server_p50_le_s"] = histogram_quantile(
            after, before, "guestbus_certificate_issue_duration_seconds", 0.50, kind="vm"
        )
        jittered["model"] = {
            "lifetime_days": LIFETIME_DAYS,
            "renew_at": "2/3 of lifetime",
            "jitter": f"±{JITTER:.0%} of lifetime",
            "real_window_s": window_real,
            "compressed_window_s": opts.window,
            "compression": round(window_real / opts.window),
            "real_rate_per_s": round(opts.vms / window_real, 4),
        }
        out["storm_jitter"] = jittered

        step(f"storm without jitter: {opts.vms} renewals at once ({opts.inflight * 4} in flight)")
        before = await scrape(port)
        t0 = time.perf_counter()
        burst = await storm(nc, fleet, 0.0, opts.inflight * 4)
        after = await scrape(port)
        burst["server_p99_le_s"] = histogram_quantile(
            after, before, "guestbus_certificate_issue_duration_seconds", 0.99, kind="vm"
        )
        out["storm_no_jitter"] = burst

        step("list: every record through one KV watch")
        out["list"] = await list_all(nc)
        samples = await scrape(port)
        out["ca_metrics"] = {
            "valid": metric(samples, "guestbus_certificates", state="valid"),
            "renewed_total": metric(samples, "guestbus_certificates_renewed_total"),
            "issued_total": metric(samples, "guestbus_certificates_issued_total"),
        }
    finally:
        await nc.close()
        await children.stop_async(ca_proc)
        await broker.stop()
    return out


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------


OPENSSL_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = URI:spiffe://{td}/vm/{vm}
"""


def openssl_peer(tmp: Path, n: int) -> dict[str, Any]:
    """``openssl x509 -req`` per certificate: CSR read and self-signature verified, same
    extensions, EC P-256 CA key, random serial."""
    exe = shutil.which("openssl")
    if exe is None:
        return {"error": "openssl not found"}
    work = tmp / "openssl"
    work.mkdir()
    now = datetime.now(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    ca = build_ca_certificate(key, now, timedelta(days=3650))
    (work / "ca.pem").write_text(pki.cert_pem(ca))
    (work / "ca.key").write_text(pki.key_pem(key))
    fleet = make_fleet(n)
    for i, (vm, csr) in enumerate(zip(fleet.vms, fleet.csrs, strict=True)):
        (work / f"{i}.csr").write_text(csr)
        (work / f"{i}.ext").write_text(OPENSSL_EXT.format(td=TRUST_DOMAIN, vm=vm))
    version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
    lat: list[float] = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        serial = f"0x{random.getrandbits(159):040x}"
        argv = [exe, "x509", "-req", "-in", str(work / f"{i}.csr"), "-CA", str(work / "ca.pem")]
        argv += ["-CAkey", str(work / "ca.key"), "-set_serial", serial]
        argv += ["-days", str(LIFETIME_DAYS), "-sha256", "-extfile", str(work / f"{i}.ext")]
        argv += ["-out", str(work / f"{i}.pem")]
        proc = subprocess.run(argv, capture_output=True)
        lat.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return {"error": proc.stderr.decode(errors="replace")[-300:]}
    out = summarize(lat, time.perf_counter() - started)
    cert = pki.load_pem_certificate((work / "0.pem").read_text())
    cert.verify_directly_issued_by(ca)
    out["version"] = version
    return out


def cryptography_peer(n: int) -> dict[str, Any]:
    """The CA's own code without bus or KV: parse + verify + policy-check the CSR, sign."""
    now = datetime.now(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    ca = CaMaterial(cert=build_ca_certificate(key, now, timedelta(days=3650)), key=key)
    fleet = make_fleet(n)
    lat: list[float] = []
    started = time.perf_counter()
    for vm, csr_pem in zip(fleet.vms, fleet.csrs, strict=True):
        t0 = time.perf_counter()
        csr = pki.parse_csr(csr_pem)
        cert = build_vm_certificate(
            ca,
            csr.public_key(),
            vm,
            TRUST_DOMAIN,
            x509.random_serial_number(),
            now - BACKDATE,
            now + timedelta(days=LIFETIME_DAYS),
        )
        pki.cert_pem(cert)
        lat.append(time.perf_counter() - t0)
    out = summarize(lat, time.perf_counter() - started)
    out["version"] = cryptography.__version__
    return out


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def compute_ratios(r: dict[str, Any]) -> dict[str, Any]:
    bus = r["bus"]
    crypto = r["peers"]["cryptography"].get("rate")
    openssl = r["peers"]["openssl"].get("rate")
    return {
        "bus_concurrent_vs_cryptography": ratio(bus["concurrent"]["rate"], crypto),
        "bus_concurrent_vs_openssl": ratio(bus["concurrent"]["rate"], openssl, 1),
        "bus_sequential_vs_openssl": ratio(bus["sequential"]["rate"], openssl, 1),
        "cryptography_vs_openssl": ratio(crypto, openssl, 1),
        "storm_peak_vs_capacity": ratio(
            bus["storm_jitter"]["peak_per_s"], bus["concurrent"]["rate"]
        ),
        "cryptography_vs_reference": ratio(crypto, REFERENCE["cryptography_per_s"]),
        "openssl_vs_reference": ratio(openssl, REFERENCE["openssl_per_s"]),
    }


def us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} µs"


def le_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"≤ {value * 1000:g} ms"


def rows_of(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    bus, peers, ratios = r["bus"], r["peers"], r["ratios"]
    seq, conc = bus["sequential"], bus["concurrent"]
    js, burst = bus["storm_jitter"], bus["storm_no_jitter"]
    model = js["model"]
    crypto, openssl = peers["cryptography"], peers["openssl"]
    headers = ["what", "rate /s", "p50", "p99", "note"]
    rows: list[list[object]] = [
        ["issuance (CSR in, certificate out, EC P-256)"],
        ["guestbus via NATS, one at a time", seq["rate"], us(seq["p50_us"]), us(seq["p99_us"]),
         "CA process + KV records + audit event"],
        [f"guestbus via NATS, {conc['inflight']} in flight", conc["rate"], us(conc["p50_us"]),
         us(conc["p99_us"]), f"{conc['n']:,} certs, errors {conc['errors']}, "
         f"CPU CA {conc['cpu_pct'].get('cert_authority', 0):.0f}% "
         f"nats {conc['cpu_pct'].get('nats_server', 0):.0f}%"],
        ["cryptography in-process (verify + sign)", crypto["rate"], us(crypto["p50_us"]),
         us(crypto["p99_us"]), f"cryptography {crypto.get('version')}; no bus, no KV"],
        ["openssl x509 -req (process per cert)", openssl.get("rate"), us(openssl.get("p50_us")),
         us(openssl.get("p99_us")), str(openssl.get("version", openssl.get("error", "")))],
        [f"renewal storm: {r['options']['vms']:,} VMs, jitter ±5% of a 90-day lifetime"],
        [f"jittered: {model['real_window_s'] / 86400:.0f}-day window compressed "
         f"{model['compression']:,}x into {model['compressed_window_s']:g} s",
         js["rate"], us(js["p50_us"]), us(js["p99_us"]),
         f"offered {js['offered_per_s']}/s, peak {js['peak_per_s']}/s, "
         f"CA histogram p99 {le_ms(js['server_p99_le_s'])}, errors {js['errors']}"],
        ["no jitter: every VM at once", burst["rate"], us(burst["p50_us"]), us(burst["p99_us"]),
         f"peak {burst['peak_per_s']}/s, CA histogram p99 {le_ms(burst['server_p99_le_s'])}, "
         f"errors {burst['errors']}"],
        ["queries"],
        ["gb.ca.list over every record (one KV watch)", None, f"{bus['list']['ms']:,.0f} ms",
         None, f"{bus['list']['records']:,} records"],
        ["ratios (same run)"],
        ["bus (in flight) / cryptography", ratios["bus_concurrent_vs_cryptography"], None, None,
         "the price of the bus + KV"],
        ["bus (in flight) / openssl", ratios["bus_concurrent_vs_openssl"], None, None, ""],
        ["bus (one at a time) / openssl", ratios["bus_sequential_vs_openssl"], None, None, ""],
        ["cryptography / openssl", ratios["cryptography_vs_openssl"], None, None,
         f"reference: ~{REFERENCE['cryptography_per_s'] / REFERENCE['openssl_per_s']:.0f}x"],
        ["storm peak / CA capacity", ratios["storm_peak_vs_capacity"], None, None,
         f"real-world rate: {model['real_rate_per_s']}/s"],
    ]  # fmt: skip
    return headers, rows


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    sigterm_as_interrupt()
    started = time.monotonic()
    step = stepper(started)
    result: dict[str, Any] = {**result_header("ca", opts), "peers": {}}
    result["machine"]["busy_before_pct"] = wait_quiet(0, "benchmark")
    with workdir("ca", opts.keep) as tmp:
        try:
            with Children(tmp / "logs") as children:
                bus = run_loop(bus_bench(children, tmp, opts, step), "uvloop")
                result["bus"] = bus
                step(f"peer: cryptography in-process, {opts.inprocess} certificates")
                result["peers"]["cryptography"] = cryptography_peer(opts.inprocess)
                step(f"peer: openssl x509 -req, {opts.openssl} processes")
                result["peers"]["openssl"] = openssl_peer(tmp, opts.openssl)
                step("done")
        except KeyboardInterrupt:
            return interrupted()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["ratios"] = compute_ratios(result)
    emit_json(result)
    headers, rows = rows_of(result)
    m = result["machine"]
    print(
        f"\ncert-authority benchmark {result['date']} — {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}, {m['nats_server']}; machine busy before start: "
        f"{m['busy_before_pct']}% of a core\n"
    )
    print(render_table(headers, rows, right=(1,)))
    print(
        "\nStorm model: a fleet enrolled at once renews at 2/3 of a 90-day lifetime with "
        "±5% jitter, i.e. within a 9-day window; that window is compressed into "
        f"{opts.window:g} s here, each renewal sent at its scheduled moment (open loop)."
    )
    if opts.markdown is not None:
        opts.markdown.write_text(markdown_table(headers, rows) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
