"""Driving one DR run: group by group, each VM through its steps, every step recorded.

Per VM: wait until its link is up (on the recovery side), ask the agent for its interfaces,
compute and **record** the target addresses, push the signed change (``dr_apply``), check
the addresses the agent reports, then run the recovery script (``dr_script``) if the plan
says so. Each transition is written to KV (compare-and-set) before the next step starts,
so a driver that picks the run up after a crash continues each VM where it was: a VM that
was ``applying`` gets the same run's change again, which its agent acknowledges without
applying it twice; the recorded target is reused (the agent's addresses have changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from guestbus.contract import (
    CMD_DR_APPLY,
    CMD_DR_SCRIPT,
    CMD_INFO,
    HEADER_DEADLINE_MS,
    HEADER_REQUEST_ID,
    DrApplyResult,
    DrNetworkChange,
    DrProgress,
    DrRun,
    DrRunKind,
    DrRunState,
    DrScriptChange,
    DrScriptReply,
    DrScriptResult,
    DrStep,
    DrStepState,
    DrTarget,
    DrVmState,
    DrVmStatus,
    GuestInfo,
    LinkKind,
    dr_event_subject,
    guest_subject,
    utcnow,
)
from guestbus.dr.plan import MappingError, override_for, target_addresses, target_for
from guestbus.runtime import BusError
from guestbus.wire import errors

from .store import Conflict, cas, run_key, vm_key

if TYPE_CHECKING:
    from .service import DrOrchestrator

log = logging.getLogger("guestbus.dr-orchestrator")

LINK_CODES = {
    errors.NO_ACTIVE_LINK,
    errors.LINK_LOST,
    errors.HELLO_REQUIRED,
    errors.UNAVAILABLE,
    errors.RATE_LIMITED,
}
MAX_ATTEMPT = 590.0  # a terminator caps a command's deadline at 600 s: long steps poll


class LostOwnership(Exception):
    """Another driver wrote this run's records: stop at once, it carries on."""


class VmFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


class Cancelled(Exception):
    pass


class LinkDown(Exception):
    pass


async def guest_command(
    svc: DrOrchestrator, vm: str, method: str, params: dict[str, Any], deadline: float, rid: str
) -> dict[str, Any]:
    """A host → guest command; :class:`LinkDown` without a link, BusError for typed errors."""
    headers = {HEADER_REQUEST_ID: rid, HEADER_DEADLINE_MS: str(max(10, int(deadline * 1000)))}
    try:
        msg = await svc.nc.request(
            guest_subject(vm, method), json.dumps(params).encode(), deadline + 2.0, headers=headers
        )
    except NoRespondersError:
        raise LinkDown(errors.NO_ACTIVE_LINK) from None
    except (NatsTimeout, asyncio.TimeoutError):
        raise BusError(errors.TIMEOUT, f"no answer to {method} within {deadline:.0f} s") from None
    err = BusError.from_reply(msg.headers, msg.data)
    if err is not None:
        if err.code in LINK_CODES:
            raise LinkDown(err.code)
        raise err
    result = json.loads(msg.data or b"{}")
    return result if isinstance(result, dict) else {}


class RunDriver:
    def __init__(self, svc: DrOrchestrator, run: DrRun, revision: int) -> None:
        self.svc = svc
        self.run = run
        self.revision = revision
        self.plan = run.plan_snapshot
        self.kind = run.kind
        self.timeouts = self.plan.timeouts
        self.status: dict[str, DrVmStatus] = {}
        self.revisions: dict[str, int | None] = {}
        self.taken: dict[str, str] = {}  # address → VM that got it in this run
        self.cancel = asyncio.Event()
        self.slots = asyncio.Semaphore(svc.settings.dr_concurrency)
        self.log = log

    # --- records -------------------------------------------------------------------------

    async def save(self, status: DrVmStatus) -> None:
        status = status.model_copy(update={"updated_at": utcnow()})
        try:
            self.revisions[status.vm] = await cas(
                self.svc.store.runs,
                vm_key(self.run.id, status.vm),
                status,
                self.revisions.get(status.vm),
            )
        except Conflict:
            raise LostOwnership(
                f"VM {status.vm} of run {self.run.id} was written by another"
            ) from None
        previous = self.status.get(status.vm)
        self.status[status.vm] = status
        if previous is None or previous.state != status.state or status.finished:
            await self.svc.publish(
                dr_event_subject(self.run.id, status.vm),
                DrProgress(
                    run=self.run.id,
                    vm=status.vm,
                    name=status.name,
                    group=status.group,
                    state=status.state.value,
                    finished=status.finished,
                    reason=status.reason,
                ),
            )

    async def save_run(self, **changes: Any) -> None:
        run = self.run.model_copy(update=changes)
        try:
            self.revision = await cas(self.svc.store.runs, run_key(run.id), run, self.revision)
        except Conflict:
            raise LostOwnership(f"run {run.id} was written by another") from None
        self.run = run

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for group in self.run.groups:
            for vm in group:
                st = self.status.get(vm)
                state = st.state.value if st else DrVmState.PENDING.value
                counts[state] = counts.get(state, 0) + 1
        return counts

    # --- the run -------------------------------------------------------------------------

    async def load(self) -> None:
        """Every VM's record, one read each (a resume must see all of them)."""
        sem = asyncio.Semaphore(64)

        async def one(group: int, vm: str) -> None:
            async with sem:
                status, rev = await self.svc.store.vm(self.run.id, vm)
            override = override_for(self.plan, vm, self.run.names.get(vm))
            if status is None:
                status = DrVmStatus(
                    run=self.run.id,
                    vm=vm,
                    name=self.run.names.get(vm),
                    group=group,
                    critical=bool(override and override.critical) or self.plan.stop_on_failure,
                )
            self.status[vm] = status
            self.revisions[vm] = rev
            if status.target is not None and status.state is not DrVmState.FAILED:
                for addr in target_addresses(status.target):
                    self.taken[addr] = vm

        await asyncio.gather(
            *(one(g, vm) for g, group in enumerate(self.run.groups) for vm in group)
        )

    async def drive(self) -> None:
        await self.load()
        watcher = asyncio.ensure_future(self._watch_cancel())
        try:
            stop_reason: str | None = None
            for g, group in enumerate(self.run.groups):
                pending = [vm for vm in group if not self.status[vm].finished]
                if stop_reason is None and not self.cancel.is_set():
                    await asyncio.gather(*(self._vm(vm) for vm in pending))
                    pending = [vm for vm in group if not self.status[vm].finished]
                for vm in pending:  # cancelled or stopped before they started
                    cancelled = self.cancel.is_set()
                    await self._end(
                        self.status[vm],
                        DrVmState.CANCELLED if cancelled else DrVmState.SKIPPED,
                        "the run was cancelled" if cancelled else stop_reason,
                    )
                failed = [
                    self.status[vm]
                    for vm in group
                    if self.status[vm].state is DrVmState.FAILED and self.status[vm].critical
                ]
                if failed and stop_reason is None:
                    stop_reason = (
                        f"not started: {failed[0].name or failed[0].vm} in group {g} failed "
                        "and the plan stops on failure"
                    )
                await self.save_run(current_group=g + 1, counts=self.counts())
            await self._finish()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _finish(self) -> None:
        counts = self.counts()
        if self.cancel.is_set():
            state = DrRunState.CANCELLED
        elif counts.get(DrVmState.FAILED.value) or counts.get(DrVmState.SKIPPED.value):
            state = DrRunState.FAILED
        else:
            state = DrRunState.SUCCEEDED
        await self.save_run(state=state, finished_at=utcnow(), counts=counts)
        await self.svc.store.finish(self.run.id)
        await self.svc.publish(
            dr_event_subject(self.run.id),
            DrProgress(run=self.run.id, state=state.value, finished=True, counts=counts),
        )
        self.log.info(
            "DR run finished", extra={"run": self.run.id, "state": state.value, "counts": counts}
        )

    async def _watch_cancel(self) -> None:
        while not self.cancel.is_set():
            with contextlib.suppress(Exception):
                if await self.svc.store.cancelled(self.run.id):
                    self.log.info("DR run cancel requested", extra={"run": self.run.id})
                    self.cancel.set()
                    return
            await asyncio.sleep(1.0)

    # --- one VM --------------------------------------------------------------------------

    def _step(
        self, status: DrVmStatus, name: str, state: DrStepState, detail: str | None = None
    ) -> dict[str, DrStep]:
        steps = dict(status.steps)
        old = steps.get(name, DrStep())
        now = utcnow()
        steps[name] = old.model_copy(
            update={
                "state": state,
                "started_at": old.started_at or now,
                "ended_at": now
                if state in (DrStepState.OK, DrStepState.FAILED, DrStepState.SKIPPED)
                else None,
                "attempts": old.attempts + (1 if state is DrStepState.RUNNING else 0),
                "detail": detail,
            }
        )
        return steps

    async def _end(self, status: DrVmStatus, state: DrVmState, reason: str | None) -> None:
        steps = dict(status.steps)
        for name in ("link", "network", "script"):
            step = steps.get(name)
            if step is not None and step.state is DrStepState.RUNNING:
                steps[name] = step.model_copy(
                    update={"state": DrStepState.FAILED, "ended_at": utcnow(), "detail": reason}
                )
        await self.save(
            status.model_copy(
                update={
                    "state": state,
                    "finished": True,
                    "reason": reason,
                    "steps": steps,
                    "finished_at": utcnow(),
                }
            )
        )
        self.svc.m_vms.labels(self.kind.value, state.value).inc()

    async def _vm(self, vm: str) -> None:
        async with self.slots:
            status = self.status[vm]
            try:
                if self.cancel.is_set():
                    raise Cancelled()
                await self._steps(vm)
            except VmFailed as exc:
                status = self.status[vm]
                steps = self._step(status, exc.step, DrStepState.FAILED, exc.reason)
                await self._end(
                    status.model_copy(update={"steps": steps}), DrVmState.FAILED, exc.reason
                )
            except Cancelled:
                await self._end(self.status[vm], DrVmState.CANCELLED, "the run was cancelled")

    def _script_mode(self, vm: str) -> bool | str:
        override = override_for(self.plan, vm, self.run.names.get(vm))
        if override is not None and override.script is not None:
            return override.script
        return self.plan.script

    async def _steps(self, vm: str) -> None:
        status = self.status[vm]
        if status.state in (DrVmState.PENDING, DrVmState.WAITING):
            info, link = await self._wait_link(vm)
            status = self.status[vm]
            target = self._target(vm, info)
            steps = self._step(status, "link", DrStepState.OK, link)
            steps = self._step(
                status.model_copy(update={"steps": steps}),
                "network",
                DrStepState.RUNNING,
                f"{len(target.interfaces)} interface(s)",
            )
            await self.save(
                status.model_copy(
                    update={
                        "state": DrVmState.APPLYING,
                        "target": target,
                        "link": link,
                        "steps": steps,
                    }
                )
            )
        status = self.status[vm]
        if status.state is DrVmState.APPLYING:
            await self._apply(vm)
        status = self.status[vm]
        mode = self._script_mode(vm)
        if status.state is DrVmState.APPLIED:
            if not mode:
                steps = self._step(status, "script", DrStepState.SKIPPED, "the plan runs no script")
                await self.save(
                    status.model_copy(
                        update={"steps": steps, "finished": True, "finished_at": utcnow()}
                    )
                )
                self.svc.m_vms.labels(self.kind.value, "applied").inc()
                return
            if self.cancel.is_set():
                raise Cancelled()
            steps = self._step(status, "script", DrStepState.RUNNING)
            await self.save(status.model_copy(update={"state": DrVmState.SCRIPT, "steps": steps}))
        status = self.status[vm]
        if status.state is DrVmState.SCRIPT:
            await self._script(vm, required=mode is True)

    async def _wait_link(self, vm: str) -> tuple[GuestInfo, str]:
        status = self.status[vm]
        if status.state is not DrVmState.WAITING:
            steps = self._step(status, "link", DrStepState.RUNNING)
            await self.save(
                status.model_copy(
                    update={"state": DrVmState.WAITING, "steps": steps, "started_at": utcnow()}
                )
            )
        loop = asyncio.get_running_loop()
        limit = self.timeouts.link
        deadline = loop.time() + limit
        event = self.svc.link_event(vm)
        hosts = set(self.plan.recovery_hosts)
        last = "no link"
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            event.clear()
            link = await self._link_label(vm)
            if link is not None and hosts and link.split("@", 1)[-1] not in hosts:
                last = f"its link is through {link}, not a recovery host"
            else:
                left = deadline - loop.time()
                try:
                    raw = await guest_command(
                        self.svc,
                        vm,
                        CMD_INFO,
                        {},
                        max(0.5, min(self.svc.settings.dr_info_timeout, left)),
                        f"dr:{self.run.id}:info:{int(time.time() * 1000)}",
                    )
                    return GuestInfo.model_validate(raw), link or "up"
                except LinkDown as exc:
                    last = f"no active link ({exc})"
                except BusError as exc:
                    if exc.code == errors.NOT_ALLOWED:
                        raise VmFailed(
                            "link", f"the agent does not allow 'info': {exc.message}"
                        ) from None
                    last = f"info: {exc.message} ({exc.code})"
                except ValidationError:
                    raise VmFailed("link", "the agent's 'info' answer is not valid") from None
            left = deadline - loop.time()
            if left <= 0:
                raise VmFailed(
                    "link",
                    f"link not up within {limit:g} s ({last}): is the VM running with its agent?",
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._either(event, self.cancel), min(left, self.svc.settings.dr_link_poll)
                )

    @staticmethod
    async def _either(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _link_label(self, vm: str) -> str | None:
        record, _ = await self.svc.registry.get(vm)
        if record is None or record.link is LinkKind.DOWN:
            return None
        return f"{record.link.value}@{record.host}"

    def _target(self, vm: str, info: GuestInfo) -> DrTarget:
        try:
            target = target_for(self.plan, self.kind, vm, self.run.names.get(vm), info.interfaces)
        except MappingError as exc:
            raise VmFailed("network", str(exc)) from None
        for addr in target_addresses(target):
            other = self.taken.get(addr)
            if other is not None and other != vm:
                name = self.run.names.get(other) or other
                raise VmFailed("network", f"address {addr} is already given to {name} in this run")
        for addr in target_addresses(target):
            self.taken[addr] = vm
        return target

    async def _retrying(
        self,
        vm: str,
        step: str,
        limit: float,
        call: Callable[[float, int], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """``call(deadline, attempt)`` until it answers, within ``limit`` s; a link that drops
        meanwhile is waited for (the agent remembers the run: a repeat is not redone)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        attempt = 0
        event = self.svc.link_event(vm)
        while True:
            attempt += 1
            left = end - loop.time()
            if left <= 0:
                raise VmFailed(step, f"{step} not confirmed within {limit:g} s")
            event.clear()
            try:
                return await call(min(left, MAX_ATTEMPT), attempt)
            except LinkDown as exc:
                why = f"link down ({exc})"
            except BusError as exc:
                if exc.code != errors.TIMEOUT:
                    raise VmFailed(step, f"the agent refused: {exc.message} ({exc.code})") from None
                why = "timeout"
            left = end - loop.time()
            if left <= 0:
                raise VmFailed(step, f"{step} not confirmed within {limit:g} s (last: {why})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, self.svc.settings.dr_link_poll))

    async def _apply(self, vm: str) -> None:
        status = self.status[vm]
        assert status.target is not None
        target = status.target
        change = DrNetworkChange(
            interfaces=target.interfaces,
            dns=target.dns,
            search=target.search,
            gateway_timeout=self.timeouts.gateway,
        )
        started = time.monotonic()

        async def call(deadline: float, attempt: int) -> dict[str, Any]:
            payload = self.svc.signer.payload(
                run=self.run.id, plan=self.plan.name, kind=self.kind, vm=vm, network=change
            )
            signed = self.svc.signer.sign(payload)
            return await guest_command(
                self.svc,
                vm,
                CMD_DR_APPLY,
                signed.model_dump(exclude_none=True),
                deadline,
                f"dr:{self.run.id}:net:{self.svc.incarnation}:{attempt}",
            )

        raw = await self._retrying(vm, "network", self.timeouts.apply, call)
        try:
            result = DrApplyResult.model_validate(raw)
        except ValidationError:
            raise VmFailed("network", "the agent's dr_apply answer is not valid") from None
        self.svc.m_step.labels("network").observe(time.monotonic() - started)
        if result.outcome != "applied":
            raise VmFailed("network", result.reason or result.outcome)
        have = {a.split("/")[0] for i in result.interfaces for a in i.addresses}
        missing = [a for a in target_addresses(target) if a not in have]
        if missing:
            raise VmFailed(
                "network",
                f"the agent applied the change but reports no {', '.join(missing)}",
            )
        status = self.status[vm]
        steps = self._step(
            status, "network", DrStepState.OK, "repeat acknowledged" if result.repeat else None
        )
        await self.save(
            status.model_copy(
                update={
                    "state": DrVmState.APPLIED,
                    "steps": steps,
                    "reported": result.interfaces,
                    "persisted": result.persisted,
                    "warnings": [*status.warnings, *result.warnings],
                    "repeat": result.repeat,
                    "applied_at": utcnow(),
                }
            )
        )

    def _script_env(self, status: DrVmStatus) -> dict[str, str]:
        target = status.target
        new = [a for i in target.interfaces for a in i.addresses] if target else []
        old = [a for i in target.interfaces for a in i.previous] if target else []
        gateways = [g for i in target.interfaces for g in i.gateways] if target else []
        return {
            "GUESTBUS_DR_ADDRESSES": " ".join(new),
            "GUESTBUS_DR_OLD_ADDRESSES": " ".join(old),
            "GUESTBUS_DR_GATEWAY": gateways[0] if gateways else "",
            "GUESTBUS_DR_DNS": " ".join(target.dns if target else []),
            "GUESTBUS_DR_SEARCH": " ".join(target.search if target else []),
            "GUESTBUS_DR_INTERFACES": " ".join(i.name or "" for i in target.interfaces)
            if target
            else "",
        }

    async def _script(self, vm: str, required: bool) -> None:
        status = self.status[vm]
        which = "test" if self.kind is DrRunKind.TEST else "production"
        spec = DrScriptChange(
            which=which,
            timeout=self.timeouts.script,
            required=required,
            env=self._script_env(status),
        )
        started = time.monotonic()

        async def call(deadline: float, attempt: int) -> dict[str, Any]:
            payload = self.svc.signer.payload(
                run=self.run.id, plan=self.plan.name, kind=self.kind, vm=vm, script=spec
            )
            signed = self.svc.signer.sign(payload)
            return await guest_command(
                self.svc,
                vm,
                CMD_DR_SCRIPT,
                signed.model_dump(exclude_none=True),
                deadline,
                f"dr:{self.run.id}:script:{self.svc.incarnation}:{attempt}",
            )

        raw = await self._retrying(vm, "script", self.timeouts.script + 30.0, call)
        try:
            reply = DrScriptReply.model_validate(raw)
        except ValidationError:
            raise VmFailed("script", "the agent's dr_script answer is not valid") from None
        self.svc.m_step.labels("script").observe(time.monotonic() - started)
        result = DrScriptResult.model_validate(reply.model_dump(exclude={"run", "repeat"}))
        status = self.status[vm].model_copy(update={"script": result})
        self.status[vm] = status
        if result.outcome in ("ok", "skipped"):
            steps = self._step(
                status,
                "script",
                DrStepState.OK if result.outcome == "ok" else DrStepState.SKIPPED,
                result.reason,
            )
            await self.save(
                status.model_copy(
                    update={
                        "state": DrVmState.SCRIPT_OK
                        if result.outcome == "ok"
                        else DrVmState.APPLIED,
                        "steps": steps,
                        "finished": True,
                        "finished_at": utcnow(),
                    }
                )
            )
            self.svc.m_vms.labels(self.kind.value, "script-ok").inc()
            return
        if result.outcome == "timeout":
            reason = f"script timed out after {self.timeouts.script:g} s"
        elif result.outcome == "failed" and result.exit_code is not None:
            reason = f"script exited with status {result.exit_code}"
        else:
            reason = f"script {result.outcome}: {result.reason or ''}".rstrip(": ")
        raise VmFailed("script", reason)
