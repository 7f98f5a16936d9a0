"""The dr-orchestrator service: DR plans and runs over the bus (docs/dr.md).

Endpoints ``gb.dr.*`` (queue group ``dr-orchestrator``) manage plans and start, show, list
and cancel runs. A run is driven by exactly one replica at a time: the one holding its lease
(``dr-run.<run>`` in KV ``gb_leases``, renewed every 5 s, expiring 15 s after the last
renewal). Every replica looks for runs nobody drives every ``GUESTBUS_DR_SCAN_INTERVAL``
seconds and picks them up where their records say they are.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.micro.request import Request
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError

from guestbus.contract import (
    DR_INFO,
    DR_PLAN_DELETE,
    DR_PLAN_GET,
    DR_PLAN_LIST,
    DR_PLAN_PUT,
    DR_QUEUE,
    DR_RUN_CANCEL,
    DR_RUN_GET,
    DR_RUN_LIST,
    DR_RUN_START,
    ERROR_CONFLICT,
    ERROR_INVALID_PLAN,
    ERROR_NO_SIGNING_KEY,
    ERROR_NOT_FOUND,
    ERROR_UNKNOWN_VM,
    EVT_LINK,
    EVT_PREFIX,
    KV_DR_KEYS,
    KV_DR_PLANS,
    KV_DR_RUNS,
    KV_LEASES,
    KV_VMS,
    LEASE_TTL_SECONDS,
    DrInfo,
    DrPlan,
    DrPlanGetRequest,
    DrPlanListReply,
    DrPlanPutReply,
    DrPlanPutRequest,
    DrPlanRecord,
    DrPlanSummary,
    DrProgress,
    DrRun,
    DrRunCancelRequest,
    DrRunGetReply,
    DrRunGetRequest,
    DrRunKind,
    DrRunListReply,
    DrRunListRequest,
    DrRunStartRequest,
    DrRunState,
    DrRunSummary,
    DrVmStatus,
    LinkEvent,
    LinkState,
    dr_event_subject,
    dr_subject,
)
from guestbus.dr.plan import check_plan, is_uuid, orphan_overrides, override_for
from guestbus.dr.signing import Signer, load_private
from guestbus.drkeys import ensure_public_key
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusError, BusService, ServiceContext, parse_request
from guestbus.runtime.service import LATENCY_BUCKETS

from . import __version__
from .driver import LostOwnership, RunDriver
from .settings import DrSettings
from .store import Conflict, DrStore, Lease, active_key, cas, run_key

RENEW_EVERY = LEASE_TTL_SECONDS / 3


def _now_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class DrOrchestrator(BusService):
    name = "dr-orchestrator"
    version = __version__
    description = "Disaster-recovery plans and failover runs: signed re-IP and recovery scripts."
    settings_cls = DrSettings

    async def setup(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings_as(DrSettings)
        self.nc = ctx.nc
        self.log = ctx.log
        self.incarnation = uuid.uuid4().hex[:12]
        try:
            keys = await ctx.js.key_value(KV_DR_KEYS)
        except BucketNotFoundError:
            self.log.warning("JetStream resources missing; provisioning them")
            await provision(ctx.js, self.settings.js_replicas)
            keys = await ctx.js.key_value(KV_DR_KEYS)
        self.store = DrStore(
            await ctx.js.key_value(KV_DR_PLANS),
            await ctx.js.key_value(KV_DR_RUNS),
            await ctx.js.key_value(KV_LEASES),
        )
        self.registry = Registry(await ctx.js.key_value(KV_VMS))
        public = await ensure_public_key(keys)
        try:
            private = (await keys.get("signing.private")).value or b""
            self.signer = Signer(load_private(private), self.settings.dr_change_validity)
        except (KeyNotFoundError, ValueError) as exc:
            raise BusError(
                ERROR_NO_SIGNING_KEY, f"cannot read the DR signing key from {KV_DR_KEYS}: {exc}"
            ) from None
        self.public_pem = public.decode()
        self.drivers: dict[str, asyncio.Task[None]] = {}
        self.leases: dict[str, Lease] = {}
        self._link_events: dict[str, asyncio.Event] = {}
        self._vms_of: dict[str, set[str]] = {}
        self._metrics(ctx)
        await ctx.subscribe(f"{EVT_PREFIX}.{EVT_LINK}.*", self._on_link)
        endpoints: list[tuple[str, Callable[[Request], Awaitable[bytes]], str]] = [
            (DR_PLAN_PUT, self.plan_put, "Validate and store a DR plan."),
            (DR_PLAN_GET, self.plan_get, "One DR plan."),
            (DR_PLAN_LIST, self.plan_list, "Every DR plan, summarised."),
            (DR_PLAN_DELETE, self.plan_delete, "Delete a DR plan (runs keep their copy)."),
            (DR_RUN_START, self.run_start, "Start a failover or test run of a plan."),
            (DR_RUN_GET, self.run_get, "A run and its VMs' per-step status."),
            (DR_RUN_LIST, self.run_list, "Runs, newest first."),
            (DR_RUN_CANCEL, self.run_cancel, "Stop a run: VMs not yet started are cancelled."),
            (DR_INFO, self.info, "This replica, its signing key id and the runs it drives."),
        ]
        for endpoint, handler, description in endpoints:
            await ctx.add_endpoint(
                endpoint.replace(".", "-"),
                handler,
                subject=dr_subject(endpoint),
                queue_group=DR_QUEUE,
                description=description,
                concurrency=16,
            )
        ctx.spawn(self._scan_loop(), name="dr-scan")
        ctx.spawn(self._renew_loop(), name="dr-leases")
        self.log.info(
            "dr-orchestrator ready",
            extra={"instance": self.settings.dr_instance, "key_id": self.signer.key_id},
        )

    def _metrics(self, ctx: ServiceContext) -> None:
        self.m_vms = Counter(
            "guestbus_dr_vms_total",
            "VMs that finished a DR run step sequence, by run kind and final state.",
            ["kind", "state"],
            registry=ctx.registry,
        )
        self.m_step = Histogram(
            "guestbus_dr_step_seconds",
            "Time of a DR step per VM (network: push until confirmed; script: its run).",
            ["step"],
            buckets=(*LATENCY_BUCKETS, 60.0, 300.0),
            registry=ctx.registry,
        )
        self.m_driving = Gauge(
            "guestbus_dr_runs_driving", "Runs this replica drives now.", registry=ctx.registry
        )

    async def teardown(self, ctx: ServiceContext) -> None:
        for task in list(self.drivers.values()):
            task.cancel()
        if self.drivers:
            await asyncio.wait(set(self.drivers.values()), timeout=5)
        for lease in list(self.leases.values()):
            await lease.release()  # another replica takes the run over at once

    # --- helpers -------------------------------------------------------------------------

    async def publish(self, subject: str, event: BaseModel) -> None:
        try:
            await self.nc.publish(subject, event.model_dump_json(exclude_none=True).encode())
        except Exception as exc:  # events are best effort; the records are the truth
            self.log.warning("could not publish %s: %s", subject, exc)

    def link_event(self, vm: str) -> asyncio.Event:
        event = self._link_events.get(vm)
        if event is None:
            event = self._link_events[vm] = asyncio.Event()
        return event

    async def _on_link(self, msg: Msg) -> None:
        try:
            event = LinkEvent.model_validate_json(msg.data)
        except ValidationError:
            return
        if event.state is LinkState.UP and event.vm in self._link_events:
            self._link_events[event.vm].set()

    # --- driving -------------------------------------------------------------------------

    def _drive(self, run: DrRun, revision: int, lease: Lease) -> None:
        self.leases[run.id] = lease
        self._vms_of[run.id] = {vm for group in run.groups for vm in group}
        driver = RunDriver(self, run, revision)
        task = asyncio.ensure_future(self._run_driver(driver))
        self.drivers[run.id] = task
        self.m_driving.set(len(self.drivers))

    async def _run_driver(self, driver: RunDriver) -> None:
        run = driver.run.id
        try:
            await driver.drive()
        except LostOwnership as exc:
            self.log.warning("stopped driving run %s: %s", run, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("driving run %s failed; another scan picks it up", run)
        finally:
            self.drivers.pop(run, None)
            self.m_driving.set(len(self.drivers))
            lease = self.leases.pop(run, None)
            if lease is not None:
                await lease.release()
            busy = {vm for d in self.drivers for vm in self._vms_of.get(d, ())}
            for vm in self._vms_of.pop(run, ()):
                if vm not in busy:
                    self._link_events.pop(vm, None)

    async def _scan_loop(self) -> None:
        while True:
            try:
                await self._scan()
            except Exception as exc:
                self.log.warning("scan for runs without a driver failed: %s", exc)
            await asyncio.sleep(self.settings.dr_scan_interval)

    async def _scan(self) -> None:
        for run_id in await self.store.active():
            if run_id in self.drivers:
                continue
            lease = Lease(self.store.leases, run_id, self.settings.dr_instance, self.incarnation)
            if not await lease.acquire():
                continue
            run, revision = await self.store.run(run_id)
            if run is None or revision is None or run.state is not DrRunState.RUNNING:
                await self.store.finish(run_id)
                await lease.release()
                continue
            resumed = run.model_copy(
                update={"driver": self.settings.dr_instance, "resumed": run.resumed + 1}
            )
            try:
                revision = await cas(self.store.runs, run_key(run_id), resumed, revision)
            except Conflict:
                await lease.release()
                continue
            self.log.info(
                "resuming DR run", extra={"run": run_id, "instance": self.settings.dr_instance}
            )
            self._drive(resumed, revision, lease)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            for run_id, lease in list(self.leases.items()):
                try:
                    await lease.renew()
                except Exception as exc:
                    self.log.error("lost the lease of run %s (%s): stopping", run_id, exc)
                    self.leases.pop(run_id, None)
                    task = self.drivers.get(run_id)
                    if task is not None:
                        task.cancel()

    # --- plans ---------------------------------------------------------------------------

    def _parse_plan(self, data: bytes) -> DrPlanPutRequest:
        try:
            return DrPlanPutRequest.model_validate_json(data or b"{}")
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in e['loc'][1:] if p != 'plan') or 'plan'}: {e['msg']}"
                if e["loc"][:1] == ("plan",)
                else f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                for e in exc.errors()
            ]
            raise BusError(
                ERROR_INVALID_PLAN,
                f"the plan is invalid: {'; '.join(problems)}",
                details={"problems": problems},
            ) from None

    async def plan_put(self, request: Request) -> bytes:
        req = self._parse_plan(request.data)
        plan = req.plan
        check = check_plan(plan)
        if check.problems:
            n = len(check.problems)
            raise BusError(
                ERROR_INVALID_PLAN,
                f"plan {plan.name} has {n} problem{'s' if n > 1 else ''}: "
                + "; ".join(check.problems),
                details={"problems": check.problems, "warnings": check.warnings},
            )
        warnings = list(check.warnings) + await self._unknown_names(plan)
        groups = len(plan.groups)
        if req.validate_only:
            return (
                DrPlanPutReply(
                    name=plan.name,
                    revision=None,
                    created=False,
                    vms=check.vms,
                    groups=groups,
                    warnings=warnings,
                )
                .model_dump_json()
                .encode()
            )
        existing = await self.store.plan(plan.name)
        last = req.expected_revision
        if last is None:
            last = existing.revision if existing is not None else 0
        body = json.dumps(
            {"plan": plan.model_dump(mode="json"), "updated_at": datetime.now(UTC).isoformat()}
        ).encode()
        try:
            revision = await cas(self.store.plans, plan.name, body, last or None)
        except Conflict:
            raise BusError(
                ERROR_CONFLICT,
                f"plan {plan.name} changed meanwhile (or exists): read it again and retry",
                409,
            ) from None
        self.log.info("DR plan stored", extra={"plan": plan.name, "revision": revision})
        return (
            DrPlanPutReply(
                name=plan.name,
                revision=revision,
                created=last == 0,
                vms=check.vms,
                groups=groups,
                warnings=warnings,
            )
            .model_dump_json()
            .encode()
        )

    async def _unknown_names(self, plan: DrPlan) -> list[str]:
        names = [ref for group in plan.groups for ref in group if not is_uuid(ref)]
        if not names:
            return []
        known = {r.name for r in await self.registry.all() if r.name}
        missing = [n for n in names if n not in known]
        if not missing:
            return []
        shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
        return [f"not in the VM registry yet: {shown} (names must resolve when a run starts)"]

    async def _plan(self, name: str) -> DrPlanRecord:
        record = await self.store.plan(name)
        if record is None:
            raise BusError(ERROR_NOT_FOUND, f"no DR plan named {name!r}", 404)
        return record

    async def plan_get(self, request: Request) -> bytes:
        req = parse_request(DrPlanGetRequest, request.data)
        return (await self._plan(req.name)).model_dump_json().encode()

    async def plan_list(self, request: Request) -> bytes:
        plans = [
            DrPlanSummary(
                name=r.plan.name,
                description=r.plan.description,
                vms=sum(len(g) for g in r.plan.groups),
                groups=len(r.plan.groups),
                revision=r.revision,
                updated_at=r.updated_at,
            )
            for r in await self.store.plans_all()
        ]
        return DrPlanListReply(plans=plans).model_dump_json().encode()

    async def plan_delete(self, request: Request) -> bytes:
        req = parse_request(DrPlanGetRequest, request.data)
        record = await self._plan(req.name)
        await self.store.plans.delete(req.name, last=record.revision)
        return b"{}"

    # --- runs ----------------------------------------------------------------------------

    async def _resolve(self, plan: DrPlan) -> tuple[list[list[str]], dict[str, str]]:
        records = await self.registry.all()
        by_uuid = {r.uuid: r for r in records}
        by_name: dict[str, list[str]] = {}
        for r in records:
            if r.name:
                by_name.setdefault(r.name, []).append(r.uuid)
        groups: list[list[str]] = []
        names: dict[str, str] = {}
        unknown: list[str] = []
        ambiguous: list[str] = []
        for group in plan.groups:
            resolved = []
            for ref in group:
                if is_uuid(ref):
                    vm = ref.lower()
                    rec = by_uuid.get(vm)
                    if rec is not None and rec.name:
                        names[vm] = rec.name
                elif len(by_name.get(ref, [])) == 1:
                    vm = by_name[ref][0]
                    names[vm] = ref
                else:
                    (ambiguous if by_name.get(ref) else unknown).append(ref)
                    continue
                resolved.append(vm)
            groups.append(resolved)
        if unknown or ambiguous:
            parts = []
            if unknown:
                parts.append(f"no VM named {', '.join(unknown)} in the registry")
            if ambiguous:
                parts.append(f"several VMs named {', '.join(ambiguous)} (use uuids)")
            raise BusError(ERROR_UNKNOWN_VM, "; ".join(parts), 404)
        seen: set[str] = set()
        for group in groups:
            for vm in group:
                if vm in seen:
                    raise BusError(
                        ERROR_INVALID_PLAN, f"VM {vm} is named twice in the plan's groups"
                    )
                seen.add(vm)
        orphans = orphan_overrides(plan, groups, names)
        if orphans:
            raise BusError(ERROR_INVALID_PLAN, "; ".join(orphans))
        return groups, names

    async def run_start(self, request: Request) -> bytes:
        req = parse_request(DrRunStartRequest, request.data)
        record = await self._plan(req.plan)
        plan = record.plan
        groups, names = await self._resolve(plan)
        if req.kind is DrRunKind.TEST and not plan.test_mappings:
            lacking = [
                names.get(vm, vm)
                for group in groups
                for vm in group
                if not (
                    (o := override_for(plan, vm, names.get(vm))) and o.test and o.test.addresses
                )
            ]
            if lacking:
                raise BusError(
                    ERROR_INVALID_PLAN,
                    f"plan {plan.name} has no test_mappings and no custom test addresses for "
                    f"{', '.join(lacking[:10])}: a test run never reuses production addresses",
                )
        wanted = {vm for group in groups for vm in group}
        for other in await self.store.active():
            run, _ = await self.store.run(other)
            if run is None or run.state is not DrRunState.RUNNING:
                continue
            busy = wanted & {vm for g in run.groups for vm in g}
            if busy:
                raise BusError(
                    ERROR_CONFLICT,
                    f"{len(busy)} VM(s) of this plan are in run {other}, still running "
                    f"(e.g. {names.get(next(iter(busy)), next(iter(busy)))}); wait for it or "
                    "cancel it",
                    409,
                )
        run_id = req.run or _now_id()
        lease = Lease(self.store.leases, run_id, self.settings.dr_instance, self.incarnation)
        if not await lease.acquire():
            raise BusError(ERROR_CONFLICT, f"run {run_id} is already being driven", 409)
        run = DrRun(
            id=run_id,
            plan=plan.name,
            plan_revision=record.revision,
            kind=req.kind,
            groups=groups,
            names=names,
            total=len(wanted),
            driver=self.settings.dr_instance,
            plan_snapshot=plan,
        )
        try:
            revision = await cas(self.store.runs, run_key(run_id), run, None)
        except Conflict:
            await lease.release()
            raise BusError(ERROR_CONFLICT, f"a run named {run_id} exists already", 409) from None
        await self.store.runs.put(active_key(run_id), b"1")
        await self.publish(dr_event_subject(run_id), DrProgress(run=run_id, state=run.state.value))
        self.log.info(
            "DR run started",
            extra={"run": run_id, "plan": plan.name, "kind": req.kind.value, "vms": run.total},
        )
        self._drive(run, revision, lease)
        return run.model_dump_json().encode()

    async def _run(self, run_id: str) -> DrRun:
        run, _ = await self.store.run(run_id)
        if run is None:
            raise BusError(ERROR_NOT_FOUND, f"no DR run {run_id!r}", 404)
        return run

    async def run_get(self, request: Request) -> bytes:
        req = parse_request(DrRunGetRequest, request.data)
        run = await self._run(req.run)
        order = [(g, vm) for g, group in enumerate(run.groups) for vm in group]
        vms: list[DrVmStatus] = []
        if req.limit:
            page = order[req.offset : req.offset + req.limit]
            have = await self.store.vms(run.id) if page else {}
            for g, vm in page:
                vms.append(
                    have.get(vm) or DrVmStatus(run=run.id, vm=vm, name=run.names.get(vm), group=g)
                )
        return DrRunGetReply(run=run, vms=vms, total=len(order)).model_dump_json().encode()

    async def run_list(self, request: Request) -> bytes:
        req = parse_request(DrRunListRequest, request.data)
        runs = [r for r in await self.store.runs_all() if req.plan is None or r.plan == req.plan]
        summaries = [
            DrRunSummary(
                id=r.id,
                plan=r.plan,
                kind=r.kind,
                state=r.state,
                created_at=r.created_at,
                finished_at=r.finished_at,
                total=r.total,
                counts=r.counts,
            )
            for r in runs[: req.limit]
        ]
        return DrRunListReply(runs=summaries).model_dump_json().encode()

    async def run_cancel(self, request: Request) -> bytes:
        req = parse_request(DrRunCancelRequest, request.data)
        run = await self._run(req.run)
        if run.state is not DrRunState.RUNNING:
            raise BusError(ERROR_CONFLICT, f"run {run.id} has finished ({run.state.value})", 409)
        await self.store.request_cancel(run.id)
        return run.model_dump_json().encode()

    async def info(self, request: Request) -> bytes:
        return (
            DrInfo(
                instance=self.settings.dr_instance,
                key_id=self.signer.key_id,
                public_key=self.public_pem,
                driving=sorted(self.drivers),
            )
            .model_dump_json()
            .encode()
        )
