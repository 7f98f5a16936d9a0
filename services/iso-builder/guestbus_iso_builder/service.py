"""The iso-builder service: per-VM ISOs, one or a thousand at a time (docs/iso.md).

A build for one VM: look it up in the registry, allocate the next configuration serial,
make a key and have the CA sign it, master the image (in a thread: pycdlib is pure Python),
write ``<output_dir>/<vm>.iso`` atomically, put it in the object store and record the
manifest with a compare-and-set on the serial it started from. A VM that fails (unknown,
CA refusal, a concurrent build) fails alone; the others go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from nats.errors import Error as NatsError
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.object_store import ObjectStore
from nats.micro.request import Request
from prometheus_client import Counter, Histogram

from guestbus import pki
from guestbus.ca_client import ca_call
from guestbus.contract import (
    CA_ISSUE,
    ERROR_ISO_FAILED,
    ERROR_NOT_FOUND,
    ERROR_UNKNOWN_VM,
    ERROR_WHEELHOUSE,
    EVT_ISO,
    EVT_PREFIX,
    ISO_BUILD,
    ISO_GET,
    ISO_INFO,
    ISO_LABEL,
    ISO_LIST,
    ISO_QUEUE,
    KV_DR_KEYS,
    KV_ISO_MANIFESTS,
    KV_VMS,
    OBJ_ISOS,
    AgentConfigFile,
    CertIssueRequest,
    CertReply,
    ErrorBody,
    IsoBuildReply,
    IsoBuildRequest,
    IsoGetRequest,
    IsoInfo,
    IsoKind,
    IsoListReply,
    IsoListRequest,
    IsoManifest,
    IsoProgress,
    IsoResult,
    iso_object_name,
    iso_subject,
)
from guestbus.drkeys import ensure_public_key
from guestbus.kvscan import kv_scan
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusError, BusService, ServiceContext, parse_request
from guestbus.runtime.service import LATENCY_BUCKETS

from . import __version__
from .content import VmMaterial, config_uuid, iso_entries, load_agent_files
from .media import build_iso_bytes
from .settings import IsoSettings
from .wheelhouse import (
    TARGET_ARCHS,
    TARGET_PYTHONS,
    Wheelhouse,
    WheelhouseError,
    ensure_wheelhouse,
    prune_wheelhouses,
)

ERROR_CONFLICT = "conflict"
BUILD_BUCKETS = (*LATENCY_BUCKETS, 60.0, 120.0)


class IsoBuilder(BusService):
    name = "iso-builder"
    version = __version__
    description = "Per-VM tools and config ISO media: single and bulk builds, manifests."
    settings_cls = IsoSettings

    async def setup(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = settings = ctx.settings_as(IsoSettings)
        self.log = ctx.log
        try:
            self.manifests = await ctx.js.key_value(KV_ISO_MANIFESTS)
            dr_keys = await ctx.js.key_value(KV_DR_KEYS)
        except BucketNotFoundError:
            self.log.warning("JetStream resources missing; provisioning them")
            await provision(ctx.js, settings.js_replicas)
            self.manifests = await ctx.js.key_value(KV_ISO_MANIFESTS)
            dr_keys = await ctx.js.key_value(KV_DR_KEYS)
        self.registry = Registry(await ctx.js.key_value(KV_VMS))
        self.objects: ObjectStore = await ctx.js.object_store(OBJ_ISOS)
        self.dr_public = await ensure_public_key(dr_keys)
        self.agent_files = load_agent_files()
        self.wheelhouse: Wheelhouse | None = None
        self._wheelhouse_lock = asyncio.Lock()
        self._slots = {
            IsoKind.CONFIG_ONLY: asyncio.Semaphore(settings.iso_concurrency),
            IsoKind.FULL: asyncio.Semaphore(settings.iso_full_concurrency),
        }
        self.output_dir = settings.output_dir
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics(ctx)
        endpoints: list[tuple[str, Callable[[Request], Awaitable[bytes]], str, int]] = [
            (ISO_BUILD, self.build, "Build full or config-only ISOs for up to 1000 VMs.", 4),
            (ISO_LIST, self.list, "Manifests of the newest ISO of each VM.", 8),
            (ISO_GET, self.get, "The manifest of one VM's newest ISO.", 8),
            (ISO_INFO, self.info, "Agent version, wheelhouse, DR verify key, gateway.", 8),
        ]
        for name, handler, description, concurrency in endpoints:
            await ctx.add_endpoint(
                name,
                handler,
                subject=iso_subject(name),
                queue_group=ISO_QUEUE,
                description=description,
                concurrency=concurrency,
            )
        self.log.info(
            "iso-builder ready",
            extra={
                "output_dir": str(self.output_dir) if self.output_dir else None,
                "gateway": f"{settings.iso_gateway_host}:{settings.iso_gateway_port}",
                "wheel_cache": str(settings.wheel_cache),
            },
        )

    def _metrics(self, ctx: ServiceContext) -> None:
        self.m_builds = Counter(
            "guestbus_iso_builds_total",
            "ISOs built for a VM, by kind and outcome (ok or the error code).",
            ["kind", "outcome"],
            registry=ctx.registry,
        )
        self.m_seconds = Histogram(
            "guestbus_iso_build_seconds",
            "Time to build one VM's ISO: registry, certificate, mastering, file, object store.",
            ["kind"],
            buckets=BUILD_BUCKETS,
            registry=ctx.registry,
        )
        self.m_bytes = Counter(
            "guestbus_iso_bytes_total",
            "Bytes of ISO images built.",
            ["kind"],
            registry=ctx.registry,
        )

    # --- the wheelhouse ------------------------------------------------------------------

    async def _ensure_wheelhouse(self, progress: Callable[[str], None]) -> Wheelhouse:
        async with self._wheelhouse_lock:
            if self.wheelhouse is None:
                loop = asyncio.get_running_loop()

                def report(message: str) -> None:
                    loop.call_soon_threadsafe(progress, message)

                try:
                    self.wheelhouse = await asyncio.to_thread(
                        ensure_wheelhouse,
                        self.settings.wheel_cache,
                        source=self.settings.iso_wheel_source,
                        progress=report,
                    )
                except WheelhouseError as exc:
                    raise BusError(ERROR_WHEELHOUSE, str(exc), 503) from None
                removed = await asyncio.to_thread(
                    prune_wheelhouses, self.settings.wheel_cache, self.wheelhouse
                )
                self.log.info(
                    "wheelhouse ready",
                    extra={
                        "wheelhouse": self.wheelhouse.id,
                        "path": str(self.wheelhouse.path),
                        "pruned": removed,
                    },
                )
            return self.wheelhouse

    # --- endpoints -----------------------------------------------------------------------

    async def build(self, request: Request) -> bytes:
        req = parse_request(IsoBuildRequest, request.data)
        job = req.job or uuid.uuid4().hex[:12]
        started = time.perf_counter()
        vms = list(dict.fromkeys(req.vms))
        subject = f"{EVT_PREFIX}.{EVT_ISO}.{job}"
        done = 0

        async def publish(event: IsoProgress) -> None:
            try:
                await self.ctx.nc.publish(subject, event.model_dump_json().encode())
            except NatsError as exc:
                self.log.warning("progress event not sent: %r", exc)

        wheelhouse: Wheelhouse | None = None
        if req.kind is IsoKind.FULL:
            notes: list[asyncio.Task[None]] = []

            def note(message: str) -> None:
                event = IsoProgress(job=job, ok=True, done=0, total=len(vms), message=message)
                notes.append(asyncio.ensure_future(publish(event)))

            wheelhouse = await self._ensure_wheelhouse(note)
            await asyncio.gather(*notes)

        async def one(vm: str) -> IsoResult:
            nonlocal done
            async with self._slots[req.kind]:
                result = await self._build_one(vm, req.kind, wheelhouse, req.store)
            done += 1
            error = result.error
            await publish(
                IsoProgress(
                    job=job,
                    vm=vm,
                    ok=result.ok,
                    done=done,
                    total=len(vms),
                    code=error.code if error else None,
                    message=error.message if error else None,
                )
            )
            return result

        results = await asyncio.gather(*(one(vm) for vm in vms))
        built = sum(1 for r in results if r.ok)
        reply = IsoBuildReply(
            job=job,
            kind=req.kind,
            built=built,
            failed=len(results) - built,
            seconds=round(time.perf_counter() - started, 6),
            results=list(results),
        )
        return reply.model_dump_json(exclude_none=True).encode()

    async def _build_one(
        self, vm: str, kind: IsoKind, wheelhouse: Wheelhouse | None, store: bool
    ) -> IsoResult:
        started = time.perf_counter()
        try:
            manifest = await self._build_vm(vm, kind, wheelhouse, store)
        except BusError as exc:
            self.m_builds.labels(kind.value, exc.code).inc()
            self.log.warning("ISO for VM %s failed: %s", vm, exc, extra={"vm": vm})
            return IsoResult(vm=vm, ok=False, error=exc.to_body())
        except Exception as exc:  # one VM's surprise must not fail the others
            self.m_builds.labels(kind.value, ERROR_ISO_FAILED).inc()
            self.log.exception("ISO for VM %s failed", vm, extra={"vm": vm})
            body = ErrorBody(code=ERROR_ISO_FAILED, message=f"{type(exc).__name__}: {exc}")
            return IsoResult(vm=vm, ok=False, error=body)
        self.m_builds.labels(kind.value, "ok").inc()
        self.m_seconds.labels(kind.value).observe(time.perf_counter() - started)
        self.m_bytes.labels(kind.value).inc(manifest.size)
        return IsoResult(vm=vm, ok=True, manifest=manifest)

    async def _build_vm(
        self, vm: str, kind: IsoKind, wheelhouse: Wheelhouse | None, store: bool
    ) -> IsoManifest:
        (record, _), (previous, revision) = await asyncio.gather(
            self.registry.get(vm), self._manifest(vm)
        )
        if record is None:
            raise BusError(
                ERROR_UNKNOWN_VM,
                f"VM {vm} is not in the registry: no serial-bridge has discovered it and no "
                "agent has said hello; check the uuid (guestbus vms) or start the VM's bridge",
                404,
            )
        serial = previous.config_serial + 1 if previous else 1
        key = pki.generate_key()
        csr = pki.make_csr(key, vm).decode()
        issue = CertIssueRequest(csr=csr, vm=vm, lifetime_seconds=self.settings.iso_cert_lifetime)
        cert = CertReply.model_validate_json(
            await ca_call(self.ctx.nc, CA_ISSUE, issue.model_dump_json(exclude_none=True).encode())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        s = self.settings
        config = AgentConfigFile(
            vm_uuid=vm,
            config_uuid="-",
            config_serial=serial,
            gateway_host=s.iso_gateway_host,
            gateway_port=s.iso_gateway_port,
            serial_device=s.iso_serial_device,
            heartbeat_interval=s.iso_heartbeat_interval,
            allowed_commands=s.iso_allowed_commands,
        )
        config = config.model_copy(
            update={"config_uuid": config_uuid(config, cert.certificate.encode())}
        )
        material = VmMaterial(
            config=config,
            name=record.name,
            ca_pem=cert.ca.encode(),
            cert_pem=cert.certificate.encode(),
            key_pem=key_pem,
            dr_public_pem=self.dr_public,
        )
        image = await asyncio.to_thread(
            build_iso_bytes,
            iso_entries(material, kind, wheelhouse, self.agent_files),
            label=ISO_LABEL,
        )
        digest = hashlib.sha256(image).hexdigest()
        path: Path | None = None
        if self.output_dir is not None:
            path = self.output_dir / f"{vm}.iso"
            await asyncio.to_thread(_write_atomic, path, image)
        object_name: str | None = None
        if store:
            object_name = iso_object_name(vm)
            await self.objects.put(object_name, image)
        manifest = IsoManifest(
            vm=vm,
            name=record.name,
            kind=kind,
            sha256=digest,
            size=len(image),
            config_uuid=config.config_uuid,
            config_serial=serial,
            agent_version=wheelhouse.agent_version if wheelhouse else _agent_version(),
            wheelhouse=wheelhouse.id if wheelhouse else None,
            cert_serial=cert.serial,
            cert_not_after=cert.not_after,
            object=object_name,
            path=str(path) if path else None,
            builder=s.iso_builder_host,
        )
        data = manifest.model_dump_json(exclude_none=True).encode()
        try:
            if revision is None:
                await self.manifests.create(vm, data)
            else:
                await self.manifests.update(vm, data, last=revision)
        except KeyWrongLastSequenceError:
            raise BusError(
                ERROR_CONFLICT,
                f"another build for VM {vm} finished first; its ISO is the current one "
                "(build again for a newer one)",
                409,
            ) from None
        self.log.info(
            "ISO built",
            extra={"vm": vm, "kind": kind.value, "serial": serial, "size": len(image)},
        )
        return manifest

    async def _manifest(self, vm: str) -> tuple[IsoManifest | None, int | None]:
        try:
            entry = await self.manifests.get(vm)
        except KeyNotFoundError:
            return None, None
        if not entry.value:
            return None, entry.revision
        return IsoManifest.model_validate_json(entry.value), entry.revision

    async def list(self, request: Request) -> bytes:
        req = parse_request(IsoListRequest, request.data or b"{}")
        if req.vms is not None:
            found = await asyncio.gather(*(self._manifest(vm) for vm in dict.fromkeys(req.vms)))
            manifests = [m for m, _ in found if m is not None]
        else:  # every manifest, by VM, in one scan of the bucket
            stored = await kv_scan(self.manifests)
            valid = IsoManifest.model_validate_json
            manifests = [valid(stored[vm].value) for vm in sorted(stored) if stored[vm].value]
        return IsoListReply(manifests=manifests).model_dump_json(exclude_none=True).encode()

    async def get(self, request: Request) -> bytes:
        req = parse_request(IsoGetRequest, request.data)
        manifest, _ = await self._manifest(req.vm)
        if manifest is None:
            raise BusError(ERROR_NOT_FOUND, f"no ISO has been built for VM {req.vm}", 404)
        return manifest.model_dump_json(exclude_none=True).encode()

    async def info(self, request: Request) -> bytes:
        s = self.settings
        reply = IsoInfo(
            agent_version=_agent_version(),
            wheelhouse=self.wheelhouse.id if self.wheelhouse else None,
            pythons=list(TARGET_PYTHONS),
            archs=list(TARGET_ARCHS),
            dr_public_key=self.dr_public.decode(),
            gateway=f"{s.iso_gateway_host}:{s.iso_gateway_port}",
            output_dir=str(self.output_dir) if self.output_dir else None,
        )
        return reply.model_dump_json().encode()


def _agent_version() -> str:
    import guestbus_agent

    return guestbus_agent.__version__


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)  # the image holds the VM's private key
    os.replace(tmp, path)
