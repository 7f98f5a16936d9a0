"""cert-authority: the cluster CA on the bus (endpoints ``gb.ca.*``, see docs/pki.md).

Stateless apart from the decrypted CA key in memory: every replica joins the
``cert-authority`` queue group and all state is in the ``gb_certs`` KV bucket. Serials are
random (159 bits) and recorded with ``create``, so a collision is detected and retried; the
CRL is replaced by compare-and-set, so its number only grows even with several replicas.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography import x509
from nats.errors import Error as NatsError
from nats.js.errors import BucketNotFoundError
from nats.micro.request import Request
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError

from guestbus import pki
from guestbus.contract import (
    CA_CRL,
    CA_GET,
    CA_INFO,
    CA_ISSUE,
    CA_LIST,
    CA_QUEUE,
    CA_RENEW,
    CA_REVOKE,
    CA_SERVER,
    ERROR_BAD_CSR,
    ERROR_CA_UNAVAILABLE,
    ERROR_NOT_FOUND,
    EVT_CERT,
    EVT_CRL,
    KV_CERTS,
    CaInfo,
    CertAction,
    CertCounts,
    CertEvent,
    CertGetReply,
    CertGetRequest,
    CertIssueRequest,
    CertKind,
    CertListReply,
    CertListRequest,
    CertRecord,
    CertReply,
    CertState,
    CrlEvent,
    CrlReply,
    CrlState,
    RevocationReason,
    RevokedEntry,
    RevokeReply,
    RevokeRequest,
    ServerCertReply,
    ServerCertRequest,
    VmCertEntry,
    VmCertIndex,
    ca_subject,
    evt_subject,
)
from guestbus.provision import provision
from guestbus.runtime import BusError, BusService, ServiceContext, parse_request
from guestbus.wire import errors

from . import __version__
from .authority import (
    BACKDATE,
    CaMaterial,
    Revoked,
    build_crl,
    build_server_certificate,
    build_vm_certificate,
)
from .bootstrap import CRL_PEM_FILE, CaStartupError, load_or_create_ca, write_atomic
from .settings import CaSettings
from .store import VM_INDEX_MAX, CertStore, Conflict

M = TypeVar("M", bound=BaseModel)

SERIAL_ATTEMPTS = 5
CRL_ATTEMPTS = 20
ISSUE_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
EXPIRING_WINDOWS = (("7d", 7 * 86400), ("21d", 21 * 86400), ("30d", 30 * 86400))


def reply(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def now_s() -> datetime:
    """Now, to the second (X.509 times have one-second resolution)."""
    return datetime.now(UTC).replace(microsecond=0)


_REASON_FLAGS = {r: x509.ReasonFlags(r.value) for r in RevocationReason}


class CertAuthority(BusService):
    name = "cert-authority"
    version = __version__
    description = (
        "Cluster CA: issues, renews and revokes VM client and gateway server certificates, "
        "publishes the CRL, exports expiry metrics."
    )
    settings_cls = CaSettings

    def __init__(self, fatal: asyncio.Event | None = None) -> None:
        self._fatal_event = fatal
        self.fatal_message: str | None = None
        """Set when the CA could not start safely (wrong passphrase, corrupt CA…)."""
        self.view: dict[str, CertRecord] = {}
        """Every certificate record as of the last scan plus this replica's own writes
        (metrics, info); lists scan afresh."""
        self.view_at = 0.0
        self.crl: CrlState | None = None
        self._crl_file_number = 0

    # --- setup -----------------------------------------------------------------------------

    async def setup(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = settings = ctx.settings_as(CaSettings)
        self.log = ctx.log
        try:
            kv = await ctx.js.key_value(KV_CERTS)
        except BucketNotFoundError:
            self.log.warning("KV bucket %s is missing; provisioning JetStream", KV_CERTS)
            await provision(ctx.js, settings.js_replicas)
            kv = await ctx.js.key_value(KV_CERTS)
        self.store = CertStore(kv)
        try:
            self.ca: CaMaterial = await load_or_create_ca(self.store, settings, self.log)
        except CaStartupError as exc:
            self.fatal_message = str(exc)
            self.log.error("cannot start: %s", exc)
            if self._fatal_event is None:
                raise
            self._fatal_event.set()
            await asyncio.Event().wait()  # serve() cancels the start once stop is set
        self.log.info(
            "cluster CA loaded",
            extra={
                "fingerprint": self.ca.fingerprint,
                "not_after": self.ca.cert.not_valid_after_utc.isoformat(),
                "trust_domain": settings.trust_domain,
                "vm_cert_lifetime": settings.max_vm_lifetime,
                "compat_1000_days": settings.cert_compat_1000_days,
            },
        )
        if settings.cert_compat_1000_days:
            self.log.warning(
                "GUESTBUS_CERT_COMPAT_1000_DAYS is on: VM certificates last 1000 days "
                "(GUESTBUS_VM_CERT_LIFETIME is ignored)"
            )
        self._metrics(ctx)
        await self._refresh_view()
        await self._ensure_crl()
        await ctx.subscribe(f"gb.evt.{EVT_CRL}.{self.ca.ca_id}", self._on_crl_event)
        signing = settings.ca_concurrency
        endpoints: list[tuple[str, Callable[[Request], Awaitable[bytes]], str, int]] = [
            (CA_ISSUE, self.issue, "Sign a VM's CSR: client cert with one URI SAN.", signing),
            (CA_RENEW, self.renew, "Like issue, linked to the VM's current certificate.", signing),
            (CA_SERVER, self.server, "Sign a TLS server certificate (DNS/IP SANs).", signing),
            (CA_REVOKE, self.revoke, "Revoke by serial or all of a VM's; signs a new CRL.", 1),
            (CA_CRL, self.get_crl, "The current CRL (PEM) and its revoked serials.", 8),
            (CA_INFO, self.info, "CA certificate, fingerprint, lifetimes and counts.", 8),
            (CA_LIST, self.list, "List certificate records with filters.", 8),
            (CA_GET, self.get, "One certificate record and its PEM.", 8),
        ]
        for name, handler, description, concurrency in endpoints:
            await ctx.add_endpoint(
                name,
                self._guarded(handler),
                subject=ca_subject(name),
                queue_group=CA_QUEUE,
                description=description,
                concurrency=concurrency,
            )
        ctx.spawn(self._maintain_forever(), name="ca-maintenance")

    def _guarded(
        self, handler: Callable[[Request], Awaitable[bytes]]
    ) -> Callable[[Request], Awaitable[bytes]]:
        """JetStream trouble while handling → ``ca_unavailable`` (503), retryable."""

        async def run(request: Request) -> bytes:
            try:
                return await handler(request)
            except (NatsError, asyncio.TimeoutError, Conflict) as exc:
                self.log.warning("KV %s unavailable: %r", KV_CERTS, exc)
                self.m_refused.labels(ERROR_CA_UNAVAILABLE).inc()
                raise BusError(
                    ERROR_CA_UNAVAILABLE,
                    f"the CA's state (KV {KV_CERTS}) is unavailable right now "
                    f"({type(exc).__name__}); retry later",
                    503,
                ) from None

        return run

    def _metrics(self, ctx: ServiceContext) -> None:
        reg = ctx.registry
        self.m_issued = Counter(
            "guestbus_certificates_issued_total",
            "Certificates issued by this replica (gb.ca.issue and gb.ca.server), by kind.",
            ["kind"],
            registry=reg,
        )
        self.m_renewed = Counter(
            "guestbus_certificates_renewed_total",
            "Certificates issued by gb.ca.renew on this replica, by kind.",
            ["kind"],
            registry=reg,
        )
        self.m_revoked = Counter(
            "guestbus_certificates_revoked_total",
            "Certificates revoked by this replica, by kind and reason.",
            ["kind", "reason"],
            registry=reg,
        )
        self.m_refused = Counter(
            "guestbus_certificate_requests_refused_total",
            "Requests refused, by code (bad_csr, identity_mismatch, bad_request; "
            "ca_unavailable when the CA's state in JetStream is unreachable).",
            ["code"],
            registry=reg,
        )
        self.m_collisions = Counter(
            "guestbus_certificate_serial_collisions_total",
            "Random serials that already existed and were drawn again.",
            registry=reg,
        )
        self.m_latency = Histogram(
            "guestbus_certificate_issue_duration_seconds",
            "Time to issue a certificate: CSR checks, signing, KV records, audit event.",
            ["kind"],
            buckets=ISSUE_BUCKETS,
            registry=reg,
        )
        self.m_crls = Counter(
            "guestbus_crls_signed_total", "CRLs signed by this replica.", registry=reg
        )
        reg.register(_ViewCollector(self))

    # --- signing -------------------------------------------------------------------------

    def _refuse(self, code: str, message: str, status: int = 400) -> BusError:
        self.m_refused.labels(code).inc()
        return BusError(code, message, status)

    def _check_csr(self, pem: str) -> x509.CertificateSigningRequest:
        try:
            return pki.parse_csr(pem)
        except pki.CsrError as exc:
            raise self._refuse(ERROR_BAD_CSR, str(exc)) from None

    async def issue(self, request: Request) -> bytes:
        return await self._issue_vm(parse_request(CertIssueRequest, request.data), renew=False)

    async def renew(self, request: Request) -> bytes:
        return await self._issue_vm(parse_request(CertIssueRequest, request.data), renew=True)

    async def _issue_vm(self, req: CertIssueRequest, *, renew: bool) -> bytes:
        started = time.perf_counter()
        vm = req.vm
        td = self.settings.trust_domain
        if req.stamped_vm is not None and req.stamped_vm != vm:
            self.log.warning(
                "refused a certificate for VM %s requested over VM %s's link",
                vm,
                req.stamped_vm,
                extra={"vm": req.stamped_vm, "claimed": vm},
            )
            raise self._refuse(
                errors.IDENTITY_MISMATCH,
                f"this request came over VM {req.stamped_vm}'s link; it cannot ask for a "
                f"certificate for VM {vm}",
                403,
            )
        # read the VM's index while the CSR is checked and signed: renew links to it and
        # every issue appends to it
        lookup = asyncio.ensure_future(self.store.get_index(vm))
        try:
            csr = self._check_csr(req.csr)
            self._check_identity(csr, vm, td)
            maximum = self.settings.max_vm_lifetime
            lifetime = min(req.lifetime_seconds or maximum, maximum)
            now = now_s()
            public_key = csr.public_key()

            def build(serial: int) -> x509.Certificate:
                return build_vm_certificate(
                    self.ca,
                    public_key,
                    vm,
                    td,
                    serial,
                    now - BACKDATE,
                    now + timedelta(seconds=lifetime),
                )

            first = build(x509.random_serial_number())
            index, revision = await lookup
        except BaseException:
            lookup.cancel()
            lookup.add_done_callback(_consume)  # its own failure, if any, is not news
            raise
        renewal_of = index.current(datetime.now(UTC)) if renew else None
        cert, record = await self._sign_and_record(
            build, CertKind.VM, vm=vm, name=None, now=now, renewal_of=renewal_of, first=first
        )
        pem = pki.cert_pem(cert)
        action = CertAction.RENEWED if renew else CertAction.ISSUED
        await asyncio.gather(
            self.store.put_pem(record.serial, pem),
            self._index(vm, record, (index, revision)),
            self._audit(vm, record, action),
        )
        (self.m_renewed if renew else self.m_issued).labels(CertKind.VM.value).inc()
        self.m_latency.labels(CertKind.VM.value).observe(time.perf_counter() - started)
        return reply(
            CertReply(
                serial=record.serial,
                vm=vm,
                certificate=pem,
                ca=self.ca.cert_pem,
                not_before=record.not_before,
                not_after=record.not_after,
                renewal_of=renewal_of,
            )
        )

    def _check_identity(self, csr: x509.CertificateSigningRequest, vm: str, td: str) -> None:
        """The CSR's CN and requested URI SAN, when present, must name ``vm``."""
        cn, uris = pki.csr_identity(csr)
        expected = pki.spiffe_id(td, vm)
        if (cn is not None and cn.lower() != vm) or (uris and uris != [expected]):
            asked = ", ".join(filter(None, [f"CN={cn}" if cn else None, *uris]))
            self.log.warning(
                "refused a CSR whose identity (%s) is not VM %s", asked, vm, extra={"vm": vm}
            )
            raise self._refuse(
                errors.IDENTITY_MISMATCH,
                f"the CSR asks for {asked}, but the certificate is for VM {vm} "
                f"(CN {vm}, URI SAN {expected})",
                403,
            )

    async def server(self, request: Request) -> bytes:
        started = time.perf_counter()
        req = parse_request(ServerCertRequest, request.data)
        try:
            dns = [pki.check_dns_name(d) for d in req.dns]
            ips = [pki.parse_ip(i) for i in req.ips]
        except pki.PkiError as exc:
            raise self._refuse(errors.BAD_REQUEST, str(exc)) from None
        if not dns and not ips:
            raise self._refuse(
                errors.BAD_REQUEST,
                "a server certificate needs at least one DNS name or IP address (dns, ips)",
            )
        csr = self._check_csr(req.csr)
        maximum = self.settings.server_cert_lifetime
        lifetime = min(req.lifetime_seconds or maximum, maximum)
        now = now_s()
        public_key = csr.public_key()
        td = self.settings.trust_domain

        def build(serial: int) -> x509.Certificate:
            return build_server_certificate(
                self.ca,
                public_key,
                req.name,
                dns,
                ips,
                td,
                serial,
                now - BACKDATE,
                now + timedelta(seconds=lifetime),
            )

        cert, record = await self._sign_and_record(
            build, CertKind.SERVER, vm=None, name=req.name, now=now, renewal_of=None
        )
        pem = pki.cert_pem(cert)
        await asyncio.gather(
            self.store.put_pem(record.serial, pem),
            self._audit(req.name, record, CertAction.ISSUED),
        )
        self.m_issued.labels(CertKind.SERVER.value).inc()
        self.m_latency.labels(CertKind.SERVER.value).observe(time.perf_counter() - started)
        return reply(
            ServerCertReply(
                serial=record.serial,
                name=req.name,
                certificate=pem,
                ca=self.ca.cert_pem,
                not_before=record.not_before,
                not_after=record.not_after,
                dns=dns,
                ips=[str(i) for i in ips],
            )
        )

    async def _sign_and_record(
        self,
        build: Callable[[int], x509.Certificate],
        kind: CertKind,
        *,
        vm: str | None,
        name: str | None,
        now: datetime,
        renewal_of: str | None,
        first: x509.Certificate | None = None,
    ) -> tuple[x509.Certificate, CertRecord]:
        """Sign with a fresh random serial (or take ``first``, already signed) and create
        its record; a serial that exists already (a collision) is drawn again."""
        for _ in range(SERIAL_ATTEMPTS):
            cert = first if first is not None else build(x509.random_serial_number())
            first = None
            record = CertRecord(
                serial=pki.serial_hex(cert),
                kind=kind,
                vm=vm,
                name=name,
                subject=cert.subject.rfc4514_string(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                issued_at=now,
                renewal_of=renewal_of,
                fingerprint=pki.fingerprint(cert),
            )
            if await self.store.create_record(record):
                self.view[record.serial] = record
                return cert, record
            self.m_collisions.inc()
            self.log.warning("serial collision on %s; drawing another", record.serial)
        raise BusError(
            ERROR_CA_UNAVAILABLE,
            f"could not record a unique serial in {SERIAL_ATTEMPTS} attempts; retry",
            503,
        )

    async def _index(
        self, vm: str, record: CertRecord, known: tuple[VmCertIndex, int | None]
    ) -> None:
        """Append to ``vm.<uuid>``; the certificate exists either way (its record names the
        VM), so a failure here only costs a later renewal its ``renewal_of`` link."""
        entry = VmCertEntry(serial=record.serial, not_after=record.not_after)

        def add(index: VmCertIndex) -> VmCertIndex | None:
            if any(e.serial == entry.serial for e in index.certificates):
                return None
            return VmCertIndex(certificates=[*index.certificates, entry][-VM_INDEX_MAX:])

        try:
            await self.store.change_index(vm, add, known)
        except Conflict:
            self.log.warning(
                "VM index of %s busy; %s not indexed", vm, record.serial, extra={"vm": vm}
            )

    async def _audit(self, token: str, record: CertRecord, action: CertAction) -> None:
        event = CertEvent(
            action=action,
            serial=record.serial,
            kind=record.kind,
            vm=record.vm,
            name=record.name,
            not_after=record.not_after,
            renewal_of=record.renewal_of,
            reason=record.reason,
        )
        try:
            await self.ctx.js.publish(evt_subject(EVT_CERT, token), reply(event))
        except Exception as exc:  # the certificate exists either way; never fail the request
            self.log.error(
                "audit event for %s %s not stored: %r",
                action.value,
                record.serial,
                exc,
                extra={"serial": record.serial},
            )
            await self.ctx.nc.publish(evt_subject(EVT_CERT, token), reply(event))

    # --- revocation and CRL ----------------------------------------------------------------

    async def revoke(self, request: Request) -> bytes:
        req = parse_request(RevokeRequest, request.data)
        if (req.serial is None) == (req.vm is None):
            raise BusError(errors.BAD_REQUEST, "give either serial or vm (exactly one) to revoke")
        now = now_s()
        if req.serial is not None:
            try:
                serials = [pki.canonical_serial(req.serial)]
            except pki.PkiError as exc:
                raise BusError(errors.BAD_REQUEST, str(exc)) from None
            if (await self.store.get_record(serials[0]))[0] is None:
                raise BusError(ERROR_NOT_FOUND, f"no certificate with serial {serials[0]}", 404)
        else:
            records = await self._refresh_view()
            mine = [r for r in records.values() if r.vm == req.vm]
            if not mine:
                raise BusError(ERROR_NOT_FOUND, f"no certificates were issued to VM {req.vm}", 404)
            serials = [r.serial for r in mine if r.effective_state(now) is CertState.VALID]
        revoked: list[CertRecord] = []
        already: list[str] = []
        for serial in serials:
            record = await self._mark_revoked(serial, req.reason, req.comment, now)
            if record is None:
                already.append(serial)
            else:
                revoked.append(record)
        crl = None if revoked else (await self.store.get_crl())[0]
        if crl is None:
            crl = await self._sign_crl(add=revoked)
        for record in revoked:
            self.m_revoked.labels(record.kind.value, req.reason.value).inc()
            await self._audit(record.vm or record.name or "unknown", record, CertAction.REVOKED)
            self.log.info(
                "revoked %s (%s)",
                record.serial,
                req.reason.value,
                extra={"serial": record.serial, "vm": record.vm, "reason": req.reason.value},
            )
        return reply(
            RevokeReply(
                revoked=[r.serial for r in revoked],
                already_revoked=already,
                reason=req.reason,
                crl_number=crl.number,
                crl_next_update=crl.next_update,
            )
        )

    async def _mark_revoked(
        self, serial: str, reason: RevocationReason, comment: str | None, now: datetime
    ) -> CertRecord | None:
        """Set the record to revoked (compare-and-set); None when it already was."""
        for attempt in range(CRL_ATTEMPTS):
            record, revision = await self.store.get_record(serial)
            if record is None or revision is None:
                raise BusError(ERROR_NOT_FOUND, f"no certificate with serial {serial}", 404)
            if record.state is CertState.REVOKED:
                return None
            new = record.model_copy(
                update={
                    "state": CertState.REVOKED,
                    "revoked_at": now,
                    "reason": reason,
                    "comment": comment,
                }
            )
            try:
                await self.store.update_record(new, revision)
            except Conflict:
                await asyncio.sleep(0.002 * (attempt + 1))
                continue
            self.view[serial] = new
            if new.vm is not None:
                await self._index_revoked(new.vm, serial)
            return new
        raise Conflict(serial)

    async def _index_revoked(self, vm: str, serial: str) -> None:
        def mark(index: VmCertIndex) -> VmCertIndex | None:
            if not any(e.serial == serial and not e.revoked for e in index.certificates):
                return None
            return VmCertIndex(
                certificates=[
                    e.model_copy(update={"revoked": True}) if e.serial == serial else e
                    for e in index.certificates
                ]
            )

        try:
            await self.store.change_index(vm, mark)
        except Conflict:
            self.log.warning("VM index of %s busy; revocation of %s not noted there", vm, serial)

    async def _sign_crl(
        self,
        *,
        add: Iterable[CertRecord] = (),
        rebuild: dict[str, CertRecord] | None = None,
        only_if: Callable[[CrlState | None], bool] | None = None,
    ) -> CrlState:
        """Sign and store the next CRL (compare-and-set on ``crl``; the number grows by one).

        Entries: those of the current CRL, plus ``add``, plus (``rebuild``) every revoked
        record in that view — minus certificates that have expired. ``only_if(current)`` False
        (checked again after a lost race) leaves the current CRL alone.
        """
        additions = list(add)
        for attempt in range(CRL_ATTEMPTS):
            current, revision = await self.store.get_crl()
            if only_if is not None and not only_if(current):
                assert current is not None
                self._adopt_crl(current)
                return current
            now = now_s()
            # a union: revocations are never undone, and another replica's CRL may hold
            # entries our view has not seen yet
            entries = {e.serial: e for e in current.revoked} if current is not None else {}
            source = [*additions, *(rebuild.values() if rebuild is not None else ())]
            for record in source:
                if record.state is CertState.REVOKED and record.revoked_at is not None:
                    entries[record.serial] = RevokedEntry(
                        serial=record.serial,
                        reason=record.reason,
                        revoked_at=record.revoked_at,
                        not_after=record.not_after,
                    )
            live = sorted(
                (e for e in entries.values() if e.not_after > now), key=lambda e: e.revoked_at
            )
            number = (current.number + 1) if current is not None else 1
            next_update = now + timedelta(seconds=self.settings.crl_lifetime)
            crl = build_crl(
                self.ca,
                [
                    Revoked(
                        pki.parse_serial(e.serial),
                        e.revoked_at,
                        _REASON_FLAGS[e.reason] if e.reason else None,
                    )
                    for e in live
                ],
                number,
                now,
                next_update,
            )
            state = CrlState(
                number=number,
                this_update=now,
                next_update=next_update,
                crl=pki.crl_pem(crl),
                revoked=live,
            )
            size = len(state.model_dump_json()) + 512
            if size > self.ctx.nc.max_payload:
                self.log.error(
                    "CRL %d with %d entries (%d bytes) exceeds the NATS max_payload (%d bytes); "
                    "not stored",
                    number,
                    len(live),
                    size,
                    self.ctx.nc.max_payload,
                )
                raise BusError(
                    ERROR_CA_UNAVAILABLE,
                    f"the CRL with {len(live)} revoked certificates ({size} bytes) no longer "
                    f"fits a NATS message (max_payload {self.ctx.nc.max_payload} bytes): raise "
                    "max_payload on the NATS servers (the records are revoked already)",
                    507,
                )
            try:
                await self.store.write_crl(state, revision)
            except Conflict:
                await asyncio.sleep(random.uniform(0.002, 0.02) * (attempt + 1))
                continue
            self.m_crls.inc()
            self._adopt_crl(state)
            self.log.info(
                "signed CRL %d (%d revoked, next update %s)",
                number,
                len(live),
                next_update.isoformat(),
                extra={"crl_number": number},
            )
            event = CrlEvent(
                number=number,
                this_update=now,
                next_update=next_update,
                revoked_count=len(live),
                crl=state.crl,
                ca_fingerprint=self.ca.fingerprint,
            )
            try:
                await self.ctx.js.publish(evt_subject(EVT_CRL, self.ca.ca_id), reply(event))
            except Exception as exc:
                self.log.error("CRL event not stored: %r", exc)
                await self.ctx.nc.publish(evt_subject(EVT_CRL, self.ca.ca_id), reply(event))
            return state
        raise Conflict("crl")

    def _adopt_crl(self, state: CrlState) -> None:
        """Remember ``state`` and write ``<state_dir>/crl.pem`` when it is newer."""
        if self.crl is None or state.number >= self.crl.number:
            self.crl = state
        if state.number > self._crl_file_number:
            write_atomic(self.settings.state_dir / CRL_PEM_FILE, state.crl.encode("ascii"))
            self._crl_file_number = state.number

    async def _on_crl_event(self, msg: object) -> None:
        try:
            event = CrlEvent.model_validate_json(getattr(msg, "data", b""))
        except ValidationError:
            return
        if event.ca_fingerprint != self.ca.fingerprint or event.number <= self._crl_file_number:
            return
        state, _ = await self.store.get_crl()  # the stored state carries the entries
        if state is not None:
            self._adopt_crl(state)

    def _crl_needs_signing(self, current: CrlState | None) -> bool:
        if current is None:
            return True
        remaining = (current.next_update - datetime.now(UTC)).total_seconds()
        if remaining < self.settings.crl_lifetime / 2:
            return True
        now = datetime.now(UTC)
        listed = {e.serial for e in current.revoked}
        return any(
            r.state is CertState.REVOKED and r.not_after > now and r.serial not in listed
            for r in self.view.values()
        )

    async def _ensure_crl(self) -> None:
        """A CRL exists, is fresh (more than half its lifetime left) and lists every revoked,
        unexpired record (a revoker that died before signing is caught up here)."""
        current, _ = await self.store.get_crl()
        if self._crl_needs_signing(current):
            await self._sign_crl(rebuild=dict(self.view), only_if=self._crl_needs_signing)
        elif current is not None:
            self._adopt_crl(current)

    async def get_crl(self, request: Request) -> bytes:
        state, _ = await self.store.get_crl()
        if state is None:
            state = await self._sign_crl(rebuild=await self._refresh_view())
        self._adopt_crl(state)
        return reply(
            CrlReply(
                number=state.number,
                this_update=state.this_update,
                next_update=state.next_update,
                crl=state.crl,
                revoked=state.revoked,
            )
        )

    # --- queries -----------------------------------------------------------------------

    async def _refresh_view(self) -> dict[str, CertRecord]:
        records = await self.store.scan()
        self.view = records
        self.view_at = time.time()
        return records

    async def info(self, request: Request) -> bytes:
        records = await self._refresh_view()
        now = datetime.now(UTC)
        counts: dict[str, dict[str, int]] = {k.value: {} for k in CertKind}
        total: dict[str, int] = {}
        for rec in records.values():
            state = rec.effective_state(now).value
            total[state] = total.get(state, 0) + 1
            per = counts[rec.kind.value]
            per[state] = per.get(state, 0) + 1
        cert = self.ca.cert
        crl = self.crl
        return reply(
            CaInfo(
                certificate=self.ca.cert_pem,
                fingerprint=self.ca.fingerprint,
                ca_id=self.ca.ca_id,
                subject=cert.subject.rfc4514_string(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                trust_domain=self.settings.trust_domain,
                vm_cert_lifetime_seconds=self.settings.max_vm_lifetime,
                server_cert_lifetime_seconds=self.settings.server_cert_lifetime,
                compat_1000_days=self.settings.cert_compat_1000_days,
                crl_number=crl.number if crl else None,
                crl_next_update=crl.next_update if crl else None,
                counts=CertCounts(**total),
                counts_by_kind={k: CertCounts(**v) for k, v in counts.items()},
            )
        )

    async def list(self, request: Request) -> bytes:
        req = parse_request(CertListRequest, request.data)
        records = await self._refresh_view()
        now = datetime.now(UTC)
        horizon = (
            now + timedelta(seconds=req.expiring_within_seconds)
            if req.expiring_within_seconds is not None
            else None
        )
        shown: list[CertRecord] = []
        for rec in records.values():
            if req.vm is not None and rec.vm != req.vm:
                continue
            if req.kind is not None and rec.kind is not req.kind:
                continue
            state = rec.effective_state(now)
            if req.state is not None and state is not req.state:
                continue
            if horizon is not None and (state is not CertState.VALID or rec.not_after > horizon):
                continue
            shown.append(rec if state is rec.state else rec.model_copy(update={"state": state}))
        shown.sort(key=lambda r: (r.not_after, r.serial))
        page = shown[req.offset : req.offset + req.limit]
        return reply(
            CertListReply(
                certificates=page, total=len(shown), truncated=req.offset + len(page) < len(shown)
            )
        )

    async def get(self, request: Request) -> bytes:
        req = parse_request(CertGetRequest, request.data)
        try:
            serial = pki.canonical_serial(req.serial)
        except pki.PkiError as exc:
            raise BusError(errors.BAD_REQUEST, str(exc)) from None
        record, _ = await self.store.get_record(serial)
        if record is None:
            raise BusError(ERROR_NOT_FOUND, f"no certificate with serial {serial}", 404)
        state = record.effective_state()
        if state is not record.state:
            record = record.model_copy(update={"state": state})
        return reply(CertGetReply(record=record, certificate=await self.store.get_pem(serial)))

    # --- maintenance -------------------------------------------------------------------------

    async def _maintain_forever(self) -> None:
        interval = self.settings.ca_scan_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            try:
                await self.maintain()
            except Exception:  # a bus hiccup must not end maintenance
                self.log.exception("CA maintenance failed")

    async def maintain(self) -> None:
        """Refresh the view (metrics), keep the CRL fresh and complete, purge old records."""
        records = await self._refresh_view()
        await self._ensure_crl()
        retention = self.settings.cert_retention
        if retention <= 0:
            return
        cutoff = datetime.now(UTC) - timedelta(seconds=retention)
        for rec in list(records.values()):
            if rec.not_after < cutoff:
                await self.store.purge(rec.serial)
                self.view.pop(rec.serial, None)

    # --- view for metrics ----------------------------------------------------------------

    def records(self) -> Iterator[CertRecord]:
        return iter(list(self.view.values()))


class _ViewCollector(Collector):
    """Certificate gauges computed at scrape time from the service's cached view."""

    def __init__(self, service: CertAuthority) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        svc = self.service
        now = datetime.now(UTC)
        counts: dict[tuple[str, str], int] = {
            (s.value, k.value): 0 for s in CertState for k in CertKind
        }
        soonest: float | None = None
        expiring = {label: 0 for label, _ in EXPIRING_WINDOWS}
        # The newest valid certificate of each VM / server: a renewed certificate stays
        # valid until it expires, so only the newest one says whether renewal happens.
        newest: dict[tuple[str, str], datetime] = {}
        for rec in svc.records():
            state = rec.effective_state(now)
            counts[(state.value, rec.kind.value)] += 1
            if state is not CertState.VALID:
                continue
            left = (rec.not_after - now).total_seconds()
            ts = rec.not_after.timestamp()
            soonest = ts if soonest is None else min(soonest, ts)
            for label, window in EXPIRING_WINDOWS:
                if left <= window:
                    expiring[label] += 1
            holder = (rec.kind.value, rec.vm or rec.name or rec.serial)
            if holder not in newest or rec.not_after > newest[holder]:
                newest[holder] = rec.not_after
        unrenewed = {(label, k.value): 0 for label, _ in EXPIRING_WINDOWS for k in CertKind}
        for (kind, _holder), not_after in newest.items():
            left = (not_after - now).total_seconds()
            for label, window in EXPIRING_WINDOWS:
                if left <= window:
                    unrenewed[(label, kind)] += 1
        by_state = GaugeMetricFamily(
            "guestbus_certificates",
            "Certificates by state (valid, revoked, expired) and kind, cluster-wide "
            "(every replica reports the same view; refreshed every GUESTBUS_CA_SCAN_INTERVAL).",
            labels=["state", "kind"],
        )
        for (state_name, kind), n in sorted(counts.items()):
            by_state.add_metric([state_name, kind], n)
        yield by_state
        soon = GaugeMetricFamily(
            "guestbus_certificates_soonest_expiry_timestamp_seconds",
            "Earliest not_after (unix time) among valid certificates; absent when none.",
        )
        if soonest is not None:
            soon.add_metric([], soonest)
        yield soon
        exp = GaugeMetricFamily(
            "guestbus_certificates_expiring",
            "Valid certificates expiring within 7, 21 or 30 days (renewed ones included: a "
            "renewed certificate stays valid until it expires).",
            labels=["within"],
        )
        for label, n in expiring.items():
            exp.add_metric([label], n)
        yield exp
        stale = GaugeMetricFamily(
            "guestbus_certificates_expiring_unrenewed",
            "VMs and servers whose newest valid certificate expires within 7, 21 or 30 days: "
            "nothing newer was issued, so renewal is not happening.",
            labels=["within", "kind"],
        )
        for (label, kind), n in unrenewed.items():
            stale.add_metric([label, kind], n)
        yield stale
        if hasattr(svc, "ca"):
            yield GaugeMetricFamily(
                "guestbus_ca_not_after_timestamp_seconds",
                "When the cluster CA certificate expires (unix time).",
                value=svc.ca.cert.not_valid_after_utc.timestamp(),
            )
        if svc.crl is not None:
            yield GaugeMetricFamily(
                "guestbus_crl_number", "Number of the current CRL.", value=svc.crl.number
            )
            yield GaugeMetricFamily(
                "guestbus_crl_next_update_timestamp_seconds",
                "nextUpdate of the current CRL (unix time).",
                value=svc.crl.next_update.timestamp(),
            )
        yield GaugeMetricFamily(
            "guestbus_certificates_view_timestamp_seconds",
            "When the certificate view behind these gauges was last read from KV (unix time).",
            value=svc.view_at,
        )
