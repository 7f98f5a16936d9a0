"""``guestbus iso …``: build, list and fetch VMs' ISO media (service iso-builder)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError, ObjectNotFoundError

from guestbus.cli.common import (
    CliError,
    add_nats_option,
    registry,
    run_async,
    service_call,
    table,
    vm_uuid,
    with_bus,
)
from guestbus.contract import (
    EVT_ISO,
    EVT_PREFIX,
    ISO_BUILD,
    ISO_GET,
    ISO_LIST,
    ISO_MAX_BATCH,
    OBJ_ISOS,
    IsoBuildReply,
    IsoBuildRequest,
    IsoGetRequest,
    IsoKind,
    IsoListReply,
    IsoListRequest,
    IsoManifest,
    IsoProgress,
    IsoResult,
    iso_subject,
)

SERVICE = "iso-builder"


class Progress:
    """A one-line bar on a terminal; on a pipe or file, a line every 10 % (logs stay short)."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.done = self.failed = 0
        self.started = time.monotonic()
        self._last_decile = -1
        self.last_event = time.monotonic()

    def note(self, message: str) -> None:
        self.last_event = time.monotonic()
        self._clear()
        print(f"  {message}", file=self.out, flush=True)
        self._draw()

    def step(self, ok: bool, vm: str, why: str | None) -> None:
        self.last_event = time.monotonic()
        self.done += 1
        if not ok:
            self.failed += 1
            self._clear()
            print(f"  failed: {vm}: {why}", file=self.out, flush=True)
        self._draw()

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        return (
            f"[{bar}] {self.done}/{self.total}  failed {self.failed}  "
            f"{self.done / elapsed:.1f} ISO/s"
        )

    def _clear(self) -> None:
        if self.tty:
            print("\r\033[K", end="", file=self.out)

    def _draw(self) -> None:
        if self.tty:
            print("\r" + self._line(), end="", file=self.out, flush=True)
            return
        decile = self.done * 10 // self.total if self.total else 10
        if decile != self._last_decile:
            self._last_decile = decile
            print(self._line(), file=self.out, flush=True)

    def finish(self) -> None:
        if self.tty:
            print("\r" + self._line(), file=self.out, flush=True)


async def _build_batch(
    nc: Client, vms: list[str], kind: IsoKind, store: bool, bar: Progress, idle: float
) -> IsoBuildReply:
    job = uuid.uuid4().hex[:16]
    seen: set[str] = set()

    async def on_progress(msg: Msg) -> None:
        try:
            event = IsoProgress.model_validate_json(msg.data)
        except ValueError:
            return
        if event.vm is None:
            if event.message:
                bar.note(event.message)
            return
        if event.vm not in seen:
            seen.add(event.vm)
            bar.step(
                event.ok, event.vm, f"{event.message} ({event.code})" if not event.ok else None
            )

    sub = await nc.subscribe(f"{EVT_PREFIX}.{EVT_ISO}.{job}", cb=on_progress)
    await nc.flush()
    request = IsoBuildRequest(vms=vms, kind=kind, job=job, store=store)
    call = asyncio.ensure_future(
        service_call(
            nc, iso_subject(ISO_BUILD), request, IsoBuildReply, service=SERVICE, timeout=24 * 3600
        )
    )
    try:
        while not call.done():
            await asyncio.wait({call}, timeout=1.0)
            if not call.done() and time.monotonic() - bar.last_event > idle:
                call.cancel()
                raise CliError(
                    f"no progress from the {SERVICE} for {idle:.0f}s (job {job}); it may have "
                    "stopped. ISOs it finished are listed by `guestbus iso ls`."
                )
        reply = call.result()
    finally:
        await sub.unsubscribe()
    for result in reply.results:  # progress events are best effort: fill in what was missed
        if result.vm not in seen:
            seen.add(result.vm)
            err = result.error
            bar.step(result.ok, result.vm, f"{err.message} ({err.code})" if err else None)
    return reply


async def _resolve(nc: Client, refs: Sequence[str], everything: bool) -> list[str]:
    if everything:
        return sorted(r.uuid for r in await (await registry(nc)).all())
    out: list[str] = []
    for ref in refs:
        out.append(await vm_uuid(nc, ref))
    return list(dict.fromkeys(out))


async def _fetch(nc: Client, manifest: IsoManifest, target: Path) -> None:
    """The image from the object store, checked against its manifest, written atomically."""
    if manifest.object is None:
        raise CliError(f"the ISO of VM {manifest.vm} was not stored in the object store")
    try:
        store = await nc.jetstream().object_store(OBJ_ISOS)
        result = await store.get(manifest.object)
    except (ObjectNotFoundError, NotFoundError):
        raise CliError(
            f"object {manifest.object} is missing from object store {OBJ_ISOS}; "
            f"build the VM's ISO again"
        ) from None
    data = result.data or b""
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise CliError(
            f"the stored ISO of VM {manifest.vm} does not match its manifest (sha256 {digest} "
            f"!= {manifest.sha256}): a newer build may be in progress; try again"
        )
    if str(target) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from None


# --- commands ---------------------------------------------------------------------------


async def _cmd_build(args: argparse.Namespace) -> int:
    kind = IsoKind.CONFIG_ONLY if args.config_only else IsoKind.FULL
    out_dir: Path | None = args.out
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    if out_dir is not None and args.no_store:
        raise CliError("--out downloads from the object store: it cannot go with --no-store", 2)

    async def work(nc: Client) -> int:
        vms = await _resolve(nc, args.vms, args.all)
        if not vms:
            raise CliError("no VMs to build for (the registry is empty)")
        bar = Progress(len(vms))
        print(f"building {len(vms)} {kind.value} ISO(s)", file=sys.stderr)
        results: list[IsoResult] = []
        for i in range(0, len(vms), ISO_MAX_BATCH):
            reply = await _build_batch(
                nc, vms[i : i + ISO_MAX_BATCH], kind, not args.no_store, bar, args.idle_timeout
            )
            results.extend(reply.results)
        bar.finish()
        built = [r for r in results if r.ok and r.manifest is not None]
        failed = [r for r in results if not r.ok]
        if out_dir is not None:
            for r in built:
                assert r.manifest is not None
                await _fetch(nc, r.manifest, out_dir / f"{r.vm}.iso")
        elapsed = time.monotonic() - bar.started
        if args.json:
            print(json.dumps([r.model_dump(mode="json", exclude_none=True) for r in results]))
        else:
            for r in built:
                m = r.manifest
                assert m is not None
                where = out_dir / f"{r.vm}.iso" if out_dir is not None else (m.path or m.object)
                print(f"{r.vm}  {m.kind.value}  serial {m.config_serial}  {m.size} B  {where}")
            for r in failed:
                err = r.error
                print(f"{r.vm}  FAILED  {err.code if err else '?'}: {err.message if err else ''}")
        print(
            f"built {len(built)} of {len(results)} ISO(s) in {elapsed:.1f}s"
            + (f"; {len(failed)} failed" if failed else ""),
            file=sys.stderr,
        )
        return 1 if failed else 0

    return await with_bus(args, work)


async def _cmd_ls(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vms = [await vm_uuid(nc, ref) for ref in args.vms] if args.vms else None
        reply = await service_call(
            nc, iso_subject(ISO_LIST), IsoListRequest(vms=vms), IsoListReply, service=SERVICE
        )
        if args.json:
            print(
                json.dumps([m.model_dump(mode="json", exclude_none=True) for m in reply.manifests])
            )
            return 0
        if not reply.manifests:
            print("no ISOs built yet (guestbus iso build <vm>)")
            return 0
        rows = [
            (
                m.vm,
                m.name or "-",
                m.kind.value,
                str(m.config_serial),
                _size(m.size),
                m.agent_version,
                m.cert_not_after.strftime("%Y-%m-%d"),
                m.built_at.strftime("%Y-%m-%d %H:%M:%S"),
            )
            for m in reply.manifests
        ]
        header = ("VM", "NAME", "KIND", "SERIAL", "SIZE", "AGENT", "CERT UNTIL", "BUILT (UTC)")
        print(table(header, rows))
        return 0

    return await with_bus(args, work)


async def _cmd_get(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        manifest = await service_call(
            nc, iso_subject(ISO_GET), IsoGetRequest(vm=vm), IsoManifest, service=SERVICE
        )
        await _fetch(nc, manifest, args.output)
        if str(args.output) != "-":
            print(
                f"wrote {args.output} ({manifest.kind.value}, serial {manifest.config_serial}, "
                f"{manifest.size} B, sha256 {manifest.sha256})",
                file=sys.stderr,
            )
        return 0

    return await with_bus(args, work)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def add_parser(sub: Any) -> None:
    iso = sub.add_parser(
        "iso",
        help="VM ISO media: build (one or many), list, fetch",
        description="Per-VM ISO media made by the iso-builder service (docs/iso.md).",
    )
    actions = iso.add_subparsers(dest="iso_action", metavar="ACTION", required=True)

    p = actions.add_parser(
        "build",
        help="build ISOs for VMs (progress on stderr)",
        description="Build each VM's ISO: its config, CA bundle, a new client certificate and "
        "key, the DR verify key and the installer; `full` ISOs add the offline wheelhouse. "
        "The service writes them to its output directory and the object store; --out also "
        "downloads them here. Exits 1 if any VM failed (each failure is listed).",
    )
    p.add_argument("vms", nargs="*", metavar="VM", help="VM uuid, name or unique uuid prefix")
    p.add_argument("--all", action="store_true", help="every VM in the registry")
    p.add_argument(
        "--config-only",
        action="store_true",
        help="config and certificates only (refreshes an installed agent)",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="also download the ISOs into DIR")
    p.add_argument(
        "--no-store", action="store_true", help="do not put the images in the object store"
    )
    p.add_argument("--json", action="store_true", help="per-VM results as JSON on stdout")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="give up when the service reports no progress for S seconds (default 300)",
    )
    add_nats_option(p)
    p.set_defaults(func=_build_entry)

    p = actions.add_parser("ls", help="list the newest ISO of each VM", description="List ISOs.")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs")
    p.add_argument("--json", action="store_true", help="manifests as JSON")
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_cmd_ls(args)))

    p = actions.add_parser(
        "get",
        help="download a VM's newest ISO",
        description="Download a VM's newest ISO from the object store, checked against its "
        "sha256. The file is written with mode 0600: it holds the VM's private key.",
    )
    p.add_argument("vm", metavar="VM", help="VM uuid, name or unique uuid prefix")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="where to write (- = stdout)",
    )
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_cmd_get(args)))


def _build_entry(args: argparse.Namespace) -> int:
    if not args.vms and not args.all:
        print("error: name the VMs to build for, or --all", file=sys.stderr)
        return 2
    if args.vms and args.all:
        print("error: give VMs or --all, not both", file=sys.stderr)
        return 2
    return run_async(_cmd_build(args))
