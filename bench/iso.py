"""ISO benchmark: per-VM ISO mastering beside genisoimage, and 1,000 VMs' ISOs through the bus.

Measures in one run (see docs/benchmarks.md, section "ISO"):

1. **Mastering, on identical content.** A VM's ISO as the iso-builder makes it
   (``content.iso_entries``: config, CA, a real EC P-256 key and certificate, DR verify key,
   README, the agent's installer and unit; for ``full`` also the offline wheelhouse), built:

   - by us: ``media.build_iso_bytes(entries, label="GUESTBUS")`` in this process (pycdlib;
     how the service builds them, minus the thread hop), image in memory;
   - by the peers: ``genisoimage -quiet -V GUESTBUS -J -R -o OUT DIR`` and, when installed,
     ``xorriso -as mkisofs`` with the same options, on a directory holding the identical
     files with the same modes (staged once), one process per ISO (spawn included: that is
     what a service calling them pays), output on tmpfs when there is one.

   Ours and the peers run interleaved in rounds so that they see the same machine. Target:
   config-only p50 / genisoimage p50 <= 1.0. Once, every output is checked with ``isoinfo``:
   label GUESTBUS, Rock Ridge and Joliet present, every file's bytes and mode as staged.
2. **1,000 VMs through the bus**: a throwaway nats-server, the cert-authority and the
   iso-builder as separate processes (uvloop, default settings but the CA passphrase, the
   output directory, the gateway host and the wheel cache), 1,000 VMs in the registry, ONE
   ``gb.iso.build`` request (config-only, store=True): every VM gets a fresh key, a
   certificate from the CA, an image on disk, in the object store and a manifest. Timed from
   the request to the reply; per-VM build time from the service's histogram
   ``guestbus_iso_build_seconds``; CPU per process; the iso-builder's RSS. Checked: all built,
   none failed, one file and one object per VM (file digests match the manifests).

Output: ONE JSON line with every figure, then readable tables with ratios and PASS/FAIL.

Usage: ``.venv/bin/python bench/iso.py [--quick] [--vms N] [--concurrency N]``; ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import pycdlib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

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
    rss_bytes,
    scrape,
    service_env,
    sigterm_as_interrupt,
    stepper,
    verdict,
    wait_quiet,
    wait_ready,
    workdir,
)
from guestbus import pki
from guestbus.contract import (
    EVT_ISO,
    EVT_PREFIX,
    ISO_BUILD,
    ISO_LABEL,
    ISO_MAX_BATCH,
    KV_ISO_MANIFESTS,
    KV_VMS,
    OBJ_ISOS,
    AgentConfigFile,
    IsoBuildReply,
    IsoBuildRequest,
    IsoKind,
    IsoManifest,
    VmRecord,
    iso_object_name,
    iso_subject,
)
from guestbus.drkeys import public_pem
from guestbus.kvscan import kv_keys
from guestbus.provision import provision
from guestbus.runtime import check_reply
from guestbus.runtime.service import run_loop
from guestbus_cert_authority.authority import (
    BACKDATE,
    CaMaterial,
    build_ca_certificate,
    build_vm_certificate,
)
from guestbus_iso_builder.content import VmMaterial, config_uuid, iso_entries, load_agent_files
from guestbus_iso_builder.media import IsoEntry, build_iso_bytes
from guestbus_iso_builder.settings import IsoSettings
from guestbus_iso_builder.wheelhouse import Wheelhouse, ensure_wheelhouse

TRUST_DOMAIN = "guestbus.local"
GATEWAY_HOST = "gateway.bench.invalid"
CA_PASSPHRASE = "bench-passphrase"
CONFIG_ONLY_TARGET = 1.0
"""Target: our config-only p50 per ISO / genisoimage's, same content, same run."""
PEERS = ("genisoimage", "xorriso")
XORRISO_SHARE = 5
"""xorriso builds 1/5 as many ISOs as the others: each takes ~100 ms, mostly a fixed wait."""


@dataclass
class Options:
    quick: bool
    reps: int  # config-only ISOs per builder
    full_reps: int  # full ISOs per builder
    rounds: int
    vms: int
    concurrency: int | None
    wheel_cache: Path
    timeout: float
    mastering: bool
    service: bool
    keep: bool
    markdown: Path | None
    wait_quiet: float


def default_wheel_cache() -> Path:
    """The test suite's wheelhouse cache (tests/iso/conftest.py): no download when present."""
    root = Path(os.environ.get("GUESTBUS_TEST_CACHE", "~/.cache/guestbus-tests")).expanduser()
    return root / "wheelhouse"


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/iso.py",
        description="guestbus ISO benchmark: per-ISO mastering beside genisoimage/xorriso on "
        "identical content, and config-only ISOs for 1,000 VMs through the bus.",
    )
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run (< 30 s)")
    p.add_argument("--reps", type=int, help="config-only ISOs per builder (1000)")
    p.add_argument("--full-reps", type=int, help="full ISOs per builder (40)")
    p.add_argument("--rounds", type=int, help="alternating rounds of ours and the peers (10)")
    p.add_argument("--vms", type=int, help=f"VMs in the bus test (1000, at most {ISO_MAX_BATCH})")
    p.add_argument(
        "--concurrency",
        type=int,
        help="VMs the iso-builder builds at once (GUESTBUS_ISO_CONCURRENCY; default: the "
        "service's own default)",
    )
    p.add_argument(
        "--wheel-cache",
        type=Path,
        default=default_wheel_cache(),
        help="wheelhouse cache (default: the test suite's, ~/.cache/guestbus-tests/wheelhouse; "
        "a cold one downloads ~21 MB)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="gb.iso.build timeout (900 s)")
    p.add_argument("--mastering-only", action="store_true", help="skip the bus test")
    p.add_argument("--service-only", action="store_true", help="only the bus test")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the machine to be idle (< 20%% of a core busy)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir with logs and ISOs")
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    a = p.parse_args(argv)
    q = a.quick
    opts = Options(
        quick=q,
        reps=a.reps or (100 if q else 1000),
        full_reps=a.full_reps or (4 if q else 40),
        rounds=a.rounds or (4 if q else 10),
        vms=a.vms or (100 if q else 1000),
        concurrency=a.concurrency,
        wheel_cache=a.wheel_cache.expanduser(),
        timeout=a.timeout,
        mastering=not a.service_only,
        service=not a.mastering_only,
        keep=a.keep,
        markdown=a.markdown,
        wait_quiet=a.wait_quiet,
    )
    for name in ("reps", "full_reps", "rounds", "vms"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if opts.vms > ISO_MAX_BATCH:
        p.error(f"--vms: one gb.iso.build request takes at most {ISO_MAX_BATCH} VMs")
    if opts.concurrency is not None and not 1 <= opts.concurrency <= 256:
        p.error("--concurrency must be within 1..256")
    if a.service_only and a.mastering_only:
        p.error("--service-only and --mastering-only exclude each other")
    return opts


# --------------------------------------------------------------------------------------
# statistics (milliseconds: an ISO takes milliseconds to seconds)
# --------------------------------------------------------------------------------------


def summarize_ms(latencies: Sequence[float], spent: float) -> dict[str, Any]:
    values = sorted(latencies)
    n = len(values)

    def pct(q: float) -> float:
        rank = max(1, -(-q * n // 100))
        return values[min(int(rank), n) - 1]

    return {
        "n": n,
        "seconds": round(spent, 3),
        "per_s": round(n / spent, 1) if spent > 0 else None,
        "p50_ms": round(pct(50) * 1e3, 3),
        "p99_ms": round(pct(99) * 1e3, 3),
        "mean_ms": round(sum(values) / n * 1e3, 3),
        "min_ms": round(values[0] * 1e3, 3),
        "max_ms": round(values[-1] * 1e3, 3),
    }


# --------------------------------------------------------------------------------------
# content: one VM's ISO, real key and certificate
# --------------------------------------------------------------------------------------


def make_material(vm: str) -> VmMaterial:
    """What the service puts on a VM's ISO, made here: a self-signed cluster CA (EC P-256)
    signs the VM's fresh key, a DR verify key, the config with its derived uuid."""
    now = datetime.now(UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = CaMaterial(cert=build_ca_certificate(ca_key, now, timedelta(days=3650)), key=ca_key)
    key = pki.generate_key()
    cert = build_vm_certificate(
        ca,
        key.public_key(),
        vm,
        TRUST_DOMAIN,
        x509.random_serial_number(),
        now - BACKDATE,
        now + timedelta(days=90),
    )
    cert_pem = pki.cert_pem(cert).encode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    config = AgentConfigFile(
        vm_uuid=vm, config_uuid="-", config_serial=1, gateway_host=GATEWAY_HOST
    )
    config = config.model_copy(update={"config_uuid": config_uuid(config, cert_pem)})
    return VmMaterial(
        config=config,
        name="bench-vm",
        ca_pem=ca.cert_pem.encode(),
        cert_pem=cert_pem,
        key_pem=key_pem,
        dr_public_pem=public_pem(Ed25519PrivateKey.generate()),
    )


def entry_bytes(entry: IsoEntry) -> bytes:
    return entry.data if isinstance(entry.data, bytes) else entry.data.read_bytes()


def stage(entries: Sequence[IsoEntry], root: Path) -> None:
    """The same files, same modes, in a directory (what genisoimage is given)."""
    root.mkdir(parents=True)
    for entry in entries:
        path = root / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(entry.data, bytes):
            path.write_bytes(entry.data)
        else:
            shutil.copyfile(entry.data, path)
        path.chmod(entry.mode)


# --------------------------------------------------------------------------------------
# mastering: ours and the peers, interleaved
# --------------------------------------------------------------------------------------

Builder = Callable[[], None]


def ours_builder(entries: Sequence[IsoEntry]) -> Builder:
    def build() -> None:
        build_iso_bytes(entries, label=ISO_LABEL)

    return build


def peer_argv(name: str, exe: str, out: Path, src: Path) -> list[str]:
    opts = ["-quiet", "-V", ISO_LABEL, "-J", "-R", "-o", str(out), str(src)]
    if name == "xorriso":
        return [exe, "-as", "mkisofs", *opts]
    return [exe, *opts]


def peer_builder(argv: list[str]) -> Builder:
    def build() -> None:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-300:]
            raise RuntimeError(f"{argv[0]} failed (exit {proc.returncode}): {tail}")

    return build


def run_interleaved(
    builders: Mapping[str, Builder], counts: Mapping[str, int], rounds: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Each builder ``counts[name]`` times, in ``rounds`` alternating batches (the machine's
    noise comes and goes: ours and the peers see the same)."""
    for build in builders.values():
        for _ in range(warmup):
            build()
    clock = time.perf_counter
    lat: dict[str, list[float]] = {name: [] for name in builders}
    spent = dict.fromkeys(builders, 0.0)
    for _ in range(rounds):
        for name, build in builders.items():
            begin = clock()
            for _ in range(max(1, counts[name] // rounds)):
                t = clock()
                build()
                lat[name].append(clock() - t)
            spent[name] += clock() - begin
    out: dict[str, dict[str, Any]] = {}
    for name in builders:
        out[name] = summarize_ms(lat[name], spent[name])
        out[name]["rounds"] = rounds
    return out


_MODE_BITS = {"r": 4, "w": 2, "x": 1}


def _mode_of(text: str) -> int:
    """``-rw-------`` → 0o600 (setuid and friends are not used on our images)."""
    mode = 0
    for i, ch in enumerate(text[1:10]):
        mode |= (_MODE_BITS.get(ch, 0)) << (3 * (2 - i // 3))
    return mode


_LISTING_DIR = re.compile(r"^Directory listing of (/.*)$")
_LISTING_FILE = re.compile(r"^(-[rwx-]{9})\s.*\]\s+(\S.*?)\s*$")


def check_image(isoinfo: str, image: Path, entries: Sequence[IsoEntry]) -> dict[str, Any]:
    """``isoinfo -d``: label, Rock Ridge, Joliet; ``isoinfo -R -l``: every file with its
    mode; ``isoinfo -R -x``: every file's bytes."""
    problems: list[str] = []
    desc = subprocess.run([isoinfo, "-d", "-i", str(image)], capture_output=True, text=True)
    label = re.search(r"^Volume id: (.*)$", desc.stdout, re.M)
    out: dict[str, Any] = {
        "label": label.group(1).strip() if label else None,
        "rock_ridge": "Rock Ridge signatures" in desc.stdout,
        "joliet": "Joliet with UCS level" in desc.stdout,
        "size": image.stat().st_size,
    }
    if out["label"] != ISO_LABEL:
        problems.append(f"label {out['label']!r}")
    if not out["rock_ridge"] or not out["joliet"]:
        problems.append("Rock Ridge or Joliet missing")
    listing = subprocess.run(
        [isoinfo, "-R", "-l", "-i", str(image)], capture_output=True, text=True
    )
    modes: dict[str, int] = {}
    where = "/"
    for line in listing.stdout.splitlines():
        if m := _LISTING_DIR.match(line):
            where = m.group(1).rstrip("/") + "/"
        elif m := _LISTING_FILE.match(line):
            modes[(where + m.group(2)).lstrip("/")] = _mode_of(m.group(1))
    want = {e.path: e.mode for e in entries}
    if set(modes) != set(want):
        problems.append(f"files differ: {sorted(set(modes) ^ set(want))[:5]}")
    problems += [f"{p}: mode {oct(modes[p])}" for p in want if p in modes and modes[p] != want[p]]
    for entry in entries:
        got = subprocess.run(
            [isoinfo, "-R", "-i", str(image), "-x", "/" + entry.path], capture_output=True
        ).stdout
        if got != entry_bytes(entry):
            problems.append(f"{entry.path}: content differs ({len(got)} bytes)")
    out["files"] = len(modes)
    out["problems"] = problems[:10]
    out["ok"] = not problems
    return out


def mastering(
    tmp: Path, out_dir: Path, opts: Options, step: Callable[[str], None]
) -> dict[str, Any]:
    agent_files = load_agent_files()
    vm = str(uuidlib.uuid4())
    material = make_material(vm)
    step(f"wheelhouse from {opts.wheel_cache} (a cold cache downloads ~21 MB)")
    wheelhouse: Wheelhouse = ensure_wheelhouse(opts.wheel_cache)
    peers = {name: shutil.which(name) for name in PEERS}
    isoinfo = shutil.which("isoinfo")
    result: dict[str, Any] = {
        "peers": {name: (exe and peer_version(name, exe)) for name, exe in peers.items()},
        "pycdlib": getattr(pycdlib, "__version__", None) or _dist_version("pycdlib"),
        "peer_output": "tmpfs" if out_dir != tmp else "temp dir",
    }
    plans = (
        (IsoKind.CONFIG_ONLY, opts.reps, 5),
        (IsoKind.FULL, opts.full_reps, 1),
    )
    for kind, count, warmup in plans:
        entries = iso_entries(material, kind, wheelhouse if kind is IsoKind.FULL else None,
                              agent_files)  # fmt: skip
        src = tmp / f"stage-{kind.value}"
        stage(entries, src)
        builders: dict[str, Builder] = {"guestbus": ours_builder(entries)}
        outputs: dict[str, Path] = {}
        for name, exe in peers.items():
            if exe is not None:
                outputs[name] = out_dir / f"{name}-{kind.value}.iso"
                builders[name] = peer_builder(peer_argv(name, exe, outputs[name], src))
        counts = {name: count for name in builders}
        if "xorriso" in counts:  # ~100 ms each, most of it a fixed wait: fewer suffice
            counts["xorriso"] = max(opts.rounds, count // XORRISO_SHARE)
        step(
            f"mastering {kind.value} ISOs ({len(entries)} files, "
            f"{sum(e.size for e in entries) / 1e6:.2f} MB): "
            + ", ".join(f"{n} x{c}" for n, c in counts.items())
            + f", {opts.rounds} interleaved rounds"
        )
        figures = run_interleaved(builders, counts, opts.rounds, warmup)
        ours = build_iso_bytes(entries, label=ISO_LABEL)
        again = build_iso_bytes(entries, label=ISO_LABEL)
        ours_path = tmp / f"guestbus-{kind.value}.iso"
        ours_path.write_bytes(ours)
        outputs = {"guestbus": ours_path, **outputs}
        checks: dict[str, Any] = {}
        if isoinfo is not None:
            step(f"checking the {kind.value} images with isoinfo")
            checks = {name: check_image(isoinfo, path, entries) for name, path in outputs.items()}
        for name, path in outputs.items():
            figures[name]["image_bytes"] = path.stat().st_size
            if name in checks:
                figures[name]["check"] = checks[name]
        figures["guestbus"]["reproducible"] = ours == again
        result[kind.value] = {
            "files": len(entries),
            "content_bytes": sum(e.size for e in entries),
            "builders": figures,
        }
    result["wheelhouse"] = wheelhouse.id
    result["isoinfo"] = isoinfo is not None
    return result


def peer_version(name: str, exe: str) -> str:
    proc = subprocess.run([exe, "-version"], capture_output=True, text=True, check=False)
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else name


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# the bus: nats-server, cert-authority, iso-builder; 1,000 VMs in one request
# --------------------------------------------------------------------------------------


def hist_mean(after: Any, before: Any, name: str, **labels: str) -> float | None:
    n = metric(after, f"{name}_count", **labels) - metric(before, f"{name}_count", **labels)
    s = metric(after, f"{name}_sum", **labels) - metric(before, f"{name}_sum", **labels)
    return s / n if n > 0 else None


async def fill_registry(nc: Client, vms: Sequence[str]) -> None:
    kv = await nc.jetstream().key_value(KV_VMS)
    sem = asyncio.Semaphore(64)

    async def put(i: int, vm: str) -> None:
        async with sem:
            record = VmRecord(uuid=vm, name=f"bench-vm-{i:04d}")
            await kv.put(vm, record.model_dump_json().encode())

    await asyncio.gather(*(put(i, vm) for i, vm in enumerate(vms)))


async def build_request(
    nc: Client, vms: Sequence[str], job: str, timeout: float, step: Callable[[str], None] | None
) -> tuple[IsoBuildReply, float]:
    """One ``gb.iso.build`` for ``vms`` (config-only, stored); progress to stderr."""
    done = 0
    every = max(1, len(vms) // 10)

    async def progress(msg: Msg) -> None:
        nonlocal done
        if b'"vm"' in msg.data:
            done += 1
            if step is not None and done % every == 0:
                step(f"  {done}/{len(vms)} built")

    sub = await nc.subscribe(f"{EVT_PREFIX}.{EVT_ISO}.{job}", cb=progress)
    await nc.flush()
    body = IsoBuildRequest(vms=list(vms), kind=IsoKind.CONFIG_ONLY, job=job, store=True)
    try:
        t0 = time.perf_counter()
        msg = await nc.request(
            iso_subject(ISO_BUILD), body.model_dump_json().encode(), timeout=timeout
        )
        elapsed = time.perf_counter() - t0
    finally:
        await sub.unsubscribe()
    return IsoBuildReply.model_validate_json(check_reply(msg.headers, msg.data)), elapsed


async def count_stored(nc: Client, vms: Sequence[str]) -> tuple[int, int]:
    """Objects in the ISO object store and keys in the manifests bucket for ``vms``."""
    js = nc.jetstream()
    obs = await js.object_store(OBJ_ISOS)
    try:
        names = {info.name for info in await obs.list(ignore_deletes=True)}
    except NotFoundError:
        names = set()
    manifests = await js.key_value(KV_ISO_MANIFESTS)
    keys = set(await kv_keys(manifests))
    objects = sum(1 for vm in vms if iso_object_name(vm) in names)
    return objects, sum(1 for vm in vms if vm in keys)


def check_files(out_dir: Path, reply: IsoBuildReply, isoinfo: str | None) -> dict[str, Any]:
    """One file per VM, whose sha256 is the manifest's; one checked with isoinfo."""
    present = matching = 0
    sample: Path | None = None
    for result in reply.results:
        path = out_dir / f"{result.vm}.iso"
        if not path.is_file():
            continue
        present += 1
        sample = sample or path
        m: IsoManifest | None = result.manifest
        if m is not None and hashlib.sha256(path.read_bytes()).hexdigest() == m.sha256:
            matching += 1
    out: dict[str, Any] = {"files": present, "sha256_match": matching}
    if sample is not None and isoinfo is not None:
        desc = subprocess.run([isoinfo, "-d", "-i", str(sample)], capture_output=True, text=True)
        label = re.search(r"^Volume id: (.*)$", desc.stdout, re.M)
        out["sample_label"] = label.group(1).strip() if label else None
    return out


async def bus_bench(
    children: Children, tmp: Path, opts: Options, step: Callable[[str], None]
) -> dict[str, Any]:
    broker = children.start_nats(tmp / "nats")
    nc = await nats.connect(broker.url, name="bench-iso")
    out: dict[str, Any] = {}
    try:
        await provision(nc.jetstream(), 1)
        ca_port, iso_port = free_port(), free_port()
        ca_env = service_env(
            broker.url, ca_port, tmp / "ca-state", GUESTBUS_CA_PASSPHRASE=CA_PASSPHRASE
        )
        ca = children.start(
            "cert-authority", [sys.executable, "-m", "guestbus_cert_authority.main"], ca_env
        )
        output_dir = tmp / "isos"
        extra = {
            "GUESTBUS_ISO_OUTPUT_DIR": str(output_dir),
            "GUESTBUS_ISO_GATEWAY_HOST": GATEWAY_HOST,
            "GUESTBUS_ISO_WHEEL_CACHE": str(opts.wheel_cache),
        }
        if opts.concurrency is not None:
            extra["GUESTBUS_ISO_CONCURRENCY"] = str(opts.concurrency)
        iso_env = service_env(broker.url, iso_port, tmp / "iso-state", **extra)
        iso = children.start(
            "iso-builder", [sys.executable, "-m", "guestbus_iso_builder.main"], iso_env
        )
        for port, proc, what in ((ca_port, ca, "cert-authority"), (iso_port, iso, "iso-builder")):
            try:
                await wait_ready(port, proc, timeout=60.0, what=what)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{children.log_tail(what)}") from None
        concurrency = opts.concurrency or IsoSettings.model_fields["iso_concurrency"].default
        out["concurrency"] = concurrency

        warm = [str(uuidlib.uuid4()) for _ in range(max(8, concurrency))]
        vms = [str(uuidlib.uuid4()) for _ in range(opts.vms)]
        step(f"registry: {opts.vms} VMs (+{len(warm)} for the warm-up)")
        await fill_registry(nc, warm + vms)
        step(f"warm-up: {len(warm)} VMs in one request")
        warm_reply, warm_s = await build_request(nc, warm, "bench-warmup", opts.timeout, None)
        out["warmup"] = {"vms": len(warm), "built": warm_reply.built, "seconds": round(warm_s, 3)}

        pids = {
            "nats_server": broker.pid or 0,
            "cert_authority": ca.pid,
            "iso_builder": iso.pid,
            "bench": os.getpid(),
        }
        rss_idle, _ = rss_bytes(iso.pid)
        peak_rss = rss_idle
        sampling = True

        async def sample_rss() -> None:
            nonlocal peak_rss
            while sampling:
                with contextlib.suppress(OSError):
                    peak_rss = max(peak_rss, rss_bytes(iso.pid)[0])
                await asyncio.sleep(0.2)

        step(f"gb.iso.build: {opts.vms} VMs, config-only, stored (concurrency {concurrency})")
        iso_before, ca_before = await scrape(iso_port), await scrape(ca_port)
        cpu0 = cpu_snapshot(pids)
        sampler = asyncio.create_task(sample_rss())
        t0 = time.perf_counter()
        try:
            reply, elapsed = await build_request(nc, vms, "bench", opts.timeout, step)
        finally:
            wall = time.perf_counter() - t0
            sampling = False
            await sampler
        cpu = cpu_percent(cpu0, cpu_snapshot(pids), wall)
        iso_after, ca_after = await scrape(iso_port), await scrape(ca_port)
        rss_after, rss_hwm = rss_bytes(iso.pid)

        name = "guestbus_iso_build_seconds"
        kind = IsoKind.CONFIG_ONLY.value
        mean_build = hist_mean(iso_after, iso_before, name, kind=kind)
        ca_issue = hist_mean(
            ca_after, ca_before, "guestbus_certificate_issue_duration_seconds", kind="vm"
        )
        step("checking files, objects and manifests")
        objects, manifests = await count_stored(nc, vms)
        files = check_files(output_dir, reply, shutil.which("isoinfo"))
        sizes = [r.manifest.size for r in reply.results if r.manifest is not None]
        mean_size = round(sum(sizes) / len(sizes)) if sizes else 0
        disk = await asyncio.to_thread(disk_probe, output_dir, mean_size or 100_000)
        cpu_ms = {
            name: round(cpu[name] / 100 * wall / reply.built * 1e3, 2)
            for name in ("iso_builder", "cert_authority", "nats_server")
            if name in cpu and reply.built
        }
        errors = sorted({f"{r.error.code}: {r.error.message}" for r in reply.results if r.error})
        out.update(
            {
                "vms": opts.vms,
                "built": reply.built,
                "failed": reply.failed,
                "errors": errors[:5],
                "seconds": round(elapsed, 3),
                "service_seconds": reply.seconds,
                "isos_per_s": round(reply.built / elapsed, 1) if elapsed > 0 else None,
                "build_mean_ms": None if mean_build is None else round(mean_build * 1e3, 2),
                "build_p50_le_ms": _ms(histogram_quantile(iso_after, iso_before, name, 0.5,
                                                          kind=kind)),
                "build_p99_le_ms": _ms(histogram_quantile(iso_after, iso_before, name, 0.99,
                                                          kind=kind)),
                "ca_issue_mean_ms": None if ca_issue is None else round(ca_issue * 1e3, 2),
                "image_bytes_mean": mean_size or None,
                "cpu_pct": cpu,
                "cpu_ms_per_iso": cpu_ms,
                "disk_write_fsync_ms": {k: disk[k] for k in ("p50_ms", "p99_ms", "mean_ms")},
                "iso_builder_rss_mb": {
                    "idle": round(rss_idle / 2**20, 1),
                    "peak_sampled": round(peak_rss / 2**20, 1),
                    "after": round(rss_after / 2**20, 1),
                    "hwm": round(rss_hwm / 2**20, 1),
                },
                "objects": objects,
                "manifests": manifests,
                **files,
            }
        )  # fmt: skip
        out["checks_pass"] = (
            reply.built == opts.vms
            and reply.failed == 0
            and files["files"] == opts.vms
            and files["sha256_match"] == opts.vms
            and objects == opts.vms
            and manifests == opts.vms
        )
    finally:
        await nc.close()
        await children.stop_async(*(p for _, p in children.procs))
        await broker.stop()
    return out


def disk_probe(directory: Path, size: int, count: int = 50) -> dict[str, Any]:
    """What the service does per image on disk (write, fsync, rename), without the rest:
    is the disk what limits the rate?"""
    data = os.urandom(size)
    lat: list[float] = []
    for i in range(count):
        t0 = time.perf_counter()
        tmp, final = directory / f".probe-{i}.tmp", directory / f"probe-{i}.iso"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        lat.append(time.perf_counter() - t0)
    for i in range(count):
        (directory / f"probe-{i}.iso").unlink()
    return summarize_ms(lat, sum(lat))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def compute_ratios(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = r.get("mastering") or {}
    for kind in (IsoKind.CONFIG_ONLY.value, IsoKind.FULL.value):
        b = (m.get(kind) or {}).get("builders") or {}
        ours = b.get("guestbus") or {}
        for peer in PEERS:
            theirs = b.get(peer)
            if not theirs:
                continue
            for stat in ("p50_ms", "p99_ms", "mean_ms"):
                key = f"{kind}_{stat.removesuffix('_ms')}_vs_{peer}"
                out[key] = ratio(ours.get(stat), theirs.get(stat))
    return out


def compute_targets(r: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    value = r["ratios"].get("config-only_p50_vs_genisoimage")
    if r.get("mastering"):
        targets["config_only_p50_vs_genisoimage"] = {
            "value": value,
            "target": f"<= {CONFIG_ONLY_TARGET}",
            "pass": None if value is None else value <= CONFIG_ONLY_TARGET,
        }
    if r.get("mastering") and r["mastering"].get("isoinfo"):
        checks = [
            fig["check"]["ok"] and fig.get("reproducible", True)
            for kind in (IsoKind.CONFIG_ONLY.value, IsoKind.FULL.value)
            for fig in r["mastering"][kind]["builders"].values()
            if "check" in fig
        ]
        targets["images_valid"] = {"pass": all(checks)}
    bus = r.get("bus")
    if bus:
        targets["bus_all_built_stored"] = {"pass": bus.get("checks_pass")}
    return targets


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def mastering_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    headers = ["ISO mastering, per ISO", "n", "p50 ms", "p99 ms", "mean ms", "ISOs/s", "note"]
    rows: list[list[object]] = []
    m = r.get("mastering")
    if not m:
        return headers, rows
    labels = {
        "guestbus": f"guestbus build_iso_bytes (pycdlib {m['pycdlib']}, in-process)",
        "genisoimage": "genisoimage -J -R (a process per ISO)",
        "xorriso": "xorriso -as mkisofs -J -R (a process per ISO)",
    }
    for kind in (IsoKind.CONFIG_ONLY.value, IsoKind.FULL.value):
        k = m[kind]
        rows.append([f"{kind}: {k['files']} files, {k['content_bytes'] / 1e6:.2f} MB of content"])
        for name, fig in k["builders"].items():
            check = fig.get("check")
            notes = [f"image {fig['image_bytes'] / 1e6:.2f} MB"]
            if check is not None:
                notes.append(
                    "isoinfo OK" if check["ok"] else "isoinfo: " + "; ".join(check["problems"])
                )
            if "reproducible" in fig:
                notes.append("byte-identical twice" if fig["reproducible"] else "NOT reproducible")
            rows.append([labels[name], fig["n"], ms(fig["p50_ms"]), ms(fig["p99_ms"]),
                         ms(fig["mean_ms"]), fig["per_s"], ", ".join(notes)])  # fmt: skip
    cpu = m.get("cpu_pct") or {}
    if cpu:
        rows.append([f"CPU meanwhile (% of one core): this benchmark with its peers "
                     f"{cpu['bench_and_peers']:.0f}, others {cpu['others']:.0f}"])  # fmt: skip
    missing = [p for p, v in m["peers"].items() if not v]
    if missing:
        rows.append([f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})"])
    return headers, rows


def bus_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    headers = ["ISOs through the bus (config-only, stored)", "value", "note"]
    b = r.get("bus")
    if not b:
        return headers, []
    cpu, rss = b["cpu_pct"], b["iso_builder_rss_mb"]
    rows: list[list[object]] = [
        [f"{b['vms']:,} VMs, one gb.iso.build request: request → reply",
         f"{b['seconds']:,.1f} s", f"service's own count {b['service_seconds']:.1f} s; "
         f"concurrency {b['concurrency']}"],
        ["rate", f"{b['isos_per_s']:,.1f} ISOs/s", "key + CSR, CA issue, master, file (fsync), "
         "object store, manifest"],
        ["per VM (guestbus_iso_build_seconds)", f"{ms(b['build_mean_ms'])} ms mean",
         f"p50 <= {ms(b['build_p50_le_ms'])} ms, p99 <= {ms(b['build_p99_le_ms'])} ms (buckets)"],
        ["of which the CA signs (its histogram, mean)", f"{ms(b['ca_issue_mean_ms'])} ms", ""],
        ["built / failed", f"{b['built']:,} / {b['failed']:,}",
         "; ".join(b["errors"]) or f"image {(b['image_bytes_mean'] or 0) / 1e3:.0f} KB"],
        ["files on disk (sha256 = manifest) / objects / manifests",
         f"{b['files']:,} ({b['sha256_match']:,}) / {b['objects']:,} / {b['manifests']:,}",
         f"label of one: {b.get('sample_label')}"],
        ["CPU % of one core: iso-builder, cert-authority, nats-server",
         f"{cpu.get('iso_builder', 0):.0f}, {cpu.get('cert_authority', 0):.0f}, "
         f"{cpu.get('nats_server', 0):.0f}",
         f"bench {cpu.get('bench', 0):.0f}, others {cpu.get('others', 0):.0f} (before the "
         f"test: {b.get('busy_before_pct')})"],
        ["CPU ms per ISO: iso-builder, cert-authority, nats-server",
         ", ".join(ms(b["cpu_ms_per_iso"].get(n)) for n in
                   ("iso_builder", "cert_authority", "nats_server")), ""],
        ["write + fsync + rename of one image in the output directory",
         f"{ms(b['disk_write_fsync_ms']['p50_ms'])} ms p50",
         f"p99 {ms(b['disk_write_fsync_ms']['p99_ms'])} ms; measured after the build, alone"],
        ["iso-builder RSS: idle / peak / after (MB)",
         f"{rss['idle']:.0f} / {rss['peak_sampled']:.0f} / {rss['after']:.0f}",
         f"VmHWM {rss['hwm']:.0f} MB"],
        ["warm-up before (not counted)", f"{b['warmup']['vms']} VMs",
         f"{b['warmup']['seconds']:.2f} s"],
    ]  # fmt: skip
    return headers, rows


def ratio_rows(r: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    headers = ["ratio (ours / peer, same run)", "value", "target", "verdict"]
    rows: list[list[object]] = []
    ratios = r["ratios"]
    target = r["targets"].get("config_only_p50_vs_genisoimage")
    for kind in (IsoKind.CONFIG_ONLY.value, IsoKind.FULL.value):
        for peer in PEERS:
            for stat in ("p50", "p99", "mean"):
                value = ratios.get(f"{kind}_{stat}_vs_{peer}")
                if value is None:
                    continue
                checked = kind == "config-only" and peer == "genisoimage" and stat == "p50"
                rows.append([
                    f"{kind} {stat} / {peer} {stat}",
                    f"{value:.2f}x",
                    f"<= {CONFIG_ONLY_TARGET}x" if checked else "",
                    verdict(target["pass"]) if checked and target else "",
                ])  # fmt: skip
    valid = r["targets"].get("images_valid")
    if valid is not None:
        rows.append(["every image: label, Rock Ridge, Joliet, files and modes (isoinfo); "
                     "ours reproducible", "", "all", verdict(valid["pass"])])  # fmt: skip
    bus = r["targets"].get("bus_all_built_stored")
    if bus is not None:
        rows.append(["bus: every VM built, on disk, in the object store, with a manifest", "",
                     "all", verdict(bus["pass"])])  # fmt: skip
    return headers, rows


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print()
    print(
        f"guestbus ISO benchmark, {r['date']}: {m['cores']} cores, {m['cpu']}, "
        f"Python {m['python']}, {m['loop']}; machine busy before start: "
        f"{m.get('busy_before_pct')}% of a core, load {m['loadavg'][0]:.2f}"
    )
    for headers, rows, right in (
        (*mastering_rows(r), (1, 2, 3, 4, 5)),
        (*bus_rows(r), ()),
        (*ratio_rows(r), ()),
    ):
        if rows:
            print()
            print(render_table(headers, rows, right=right))
    failed = [k for k, v in r["targets"].items() if v.get("pass") is False]
    print()
    print("targets: " + ("all PASS" if not failed else "FAIL: " + ", ".join(failed)))


def markdown(r: dict[str, Any]) -> str:
    parts = []
    for headers, rows in (mastering_rows(r), bus_rows(r), ratio_rows(r)):
        if rows:
            parts.append(markdown_table(headers, rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def own_cpu_seconds() -> float:
    """CPU this process and its finished children (the peers' processes) used so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def mastering_cpu(before: tuple[dict[str, float], float, float]) -> dict[str, float]:
    """% of one core: the benchmark with the peers it ran, and everything else (noise)."""
    machine0, own0, t0 = before
    seconds = time.monotonic() - t0
    own = own_cpu_seconds() - own0
    busy = cpu_snapshot({}).get("machine", math.nan) - machine0.get("machine", math.nan)
    return {
        "bench_and_peers": round(own / seconds * 100, 1),
        "others": round(max(0.0, busy - own) / seconds * 100, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    sigterm_as_interrupt()
    result: dict[str, Any] = result_header("iso", opts)
    if opts.wheel_cache == default_wheel_cache():
        result["options"]["wheel_cache"] = "(the test suite's cache)"
    started = time.monotonic()
    step = stepper(started)
    with workdir("iso", opts.keep) as tmp, peer_output_dir(tmp) as out_dir:
        try:
            result["machine"]["busy_before_pct"] = wait_quiet(opts.wait_quiet, "benchmark")
            result["machine"]["loadavg"] = os.getloadavg()
            with Children(tmp / "logs") as children:
                if opts.mastering:
                    before = (cpu_snapshot({}), own_cpu_seconds(), time.monotonic())
                    result["mastering"] = mastering(tmp, out_dir, opts, step)
                    result["mastering"]["cpu_pct"] = mastering_cpu(before)
                if opts.service:
                    busy = wait_quiet(opts.wait_quiet, "bus test") if opts.mastering else None
                    step("bus: nats-server, cert-authority, iso-builder")
                    result["bus"] = run_loop(bus_bench(children, tmp, opts, step), "uvloop")
                    result["bus"]["busy_before_pct"] = (
                        result["machine"]["busy_before_pct"] if busy is None else busy
                    )
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


@contextlib.contextmanager
def peer_output_dir(tmp: Path) -> Iterator[Path]:
    """Where the peers write their images: tmpfs when there is one (no disk cost for them;
    ours stays in memory), else ``tmp``."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp
        return
    out_dir = Path(tempfile.mkdtemp(prefix="guestbus-bench-iso-", dir=shm))
    try:
        yield out_dir
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
