"""DR state in JetStream KV: plans, runs, per-VM status, leases.

Every write that could race is a compare-and-set on the revision the writer last saw; the
driver of a run writes its records only with the revision it read, so a replica that lost
its lease (and does not know it yet) cannot overwrite what the new driver wrote.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from guestbus.contract import DR_LEASE_PREFIX, DrPlanRecord, DrRun, DrVmStatus
from guestbus.kvscan import KvItem, kv_scan

M = TypeVar("M", bound=BaseModel)


class Conflict(Exception):
    """A compare-and-set lost: someone else wrote first."""


def run_key(run: str) -> str:
    return f"run.{run}"


def vm_key(run: str, vm: str) -> str:
    return f"vm.{run}.{vm}"


def active_key(run: str) -> str:
    return f"active.{run}"


def cancel_key(run: str) -> str:
    return f"cancel.{run}"


def lease_key(run: str) -> str:
    return f"{DR_LEASE_PREFIX}{run}"


def _wrong_last(exc: Exception) -> bool:
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    return isinstance(exc, APIError) and "wrong last sequence" in str(exc).lower()


async def get_model(kv: KeyValue, key: str, model: type[M]) -> tuple[M | None, int | None]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, None
    if not entry.value:
        return None, entry.revision
    return model.model_validate_json(entry.value), entry.revision


async def cas(kv: KeyValue, key: str, value: BaseModel | bytes, last: int | None) -> int:
    """Create (``last`` None) or update at revision ``last``; :class:`Conflict` otherwise."""
    data = value if isinstance(value, bytes) else value.model_dump_json().encode()
    try:
        if last is None:
            return await kv.create(key, data)
        return await kv.update(key, data, last=last)
    except (KeyWrongLastSequenceError, APIError) as exc:
        if _wrong_last(exc):
            raise Conflict(key) from None
        raise


async def snapshot(kv: KeyValue, pattern: str) -> dict[str, KvItem]:
    """The newest value of every key matching ``pattern`` that has one (not empty)."""
    return {key: item for key, item in (await kv_scan(kv, pattern)).items() if item.value}


class DrStore:
    def __init__(self, plans: KeyValue, runs: KeyValue, leases: KeyValue) -> None:
        self.plans = plans
        self.runs = runs
        self.leases = leases

    # --- plans -------------------------------------------------------------------------

    async def plan(self, name: str) -> DrPlanRecord | None:
        try:
            entry = await self.plans.get(name)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        data = json.loads(entry.value)
        return DrPlanRecord.model_validate({**data, "revision": entry.revision})

    async def plans_all(self) -> list[DrPlanRecord]:
        entries = await snapshot(self.plans, ">")
        out = []
        for item in entries.values():
            data = json.loads(item.value)
            out.append(DrPlanRecord.model_validate({**data, "revision": item.revision}))
        return sorted(out, key=lambda r: r.plan.name)

    # --- runs --------------------------------------------------------------------------

    async def run(self, run: str) -> tuple[DrRun | None, int | None]:
        return await get_model(self.runs, run_key(run), DrRun)

    async def runs_all(self) -> list[DrRun]:
        entries = await snapshot(self.runs, "run.*")
        runs = [DrRun.model_validate_json(item.value) for item in entries.values()]
        return sorted(runs, key=lambda r: r.created_at, reverse=True)

    async def active(self) -> list[str]:
        return [k.split(".", 1)[1] for k in await snapshot(self.runs, "active.*")]

    async def vm(self, run: str, vm: str) -> tuple[DrVmStatus | None, int | None]:
        return await get_model(self.runs, vm_key(run, vm), DrVmStatus)

    async def vms(self, run: str) -> dict[str, DrVmStatus]:
        entries = await snapshot(self.runs, f"vm.{run}.*")
        out = {}
        for item in entries.values():
            status = DrVmStatus.model_validate_json(item.value)
            out[status.vm] = status
        return out

    async def cancelled(self, run: str) -> bool:
        try:
            entry = await self.runs.get(cancel_key(run))
        except KeyNotFoundError:
            return False
        return bool(entry.value)

    async def request_cancel(self, run: str) -> None:
        await self.runs.put(cancel_key(run), b"1")

    async def finish(self, run: str) -> None:
        for key in (active_key(run), cancel_key(run)):
            with contextlib.suppress(KeyNotFoundError):
                await self.runs.delete(key)


class Lease:
    """``dr-run.<run>`` in KV ``gb_leases``: who drives a run. Expires (bucket TTL) unless
    renewed; a replica restarted under the same instance name takes its own lease back."""

    def __init__(self, kv: KeyValue, run: str, instance: str, incarnation: str) -> None:
        self.kv = kv
        self.key = lease_key(run)
        self.instance = instance
        self.incarnation = incarnation
        self.revision: int | None = None

    def _value(self) -> bytes:
        return json.dumps(
            {"owner": self.instance, "incarnation": self.incarnation, "at": time.time()}
        ).encode()

    async def acquire(self) -> bool:
        try:
            self.revision = await cas(self.kv, self.key, self._value(), None)
            return True
        except Conflict:
            pass
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            return False  # it just expired: the next scan takes it
        try:
            holder = json.loads(entry.value or b"{}")
        except ValueError:
            holder = {}
        if holder.get("owner") == self.instance and holder.get("incarnation") != self.incarnation:
            # our own previous process (killed): no one else can hold this name
            try:
                self.revision = await cas(self.kv, self.key, self._value(), entry.revision)
                return True
            except Conflict:
                return False
        return False

    async def renew(self) -> None:
        """Raises :class:`Conflict` when the lease was lost (expired and taken)."""
        try:
            self.revision = await cas(self.kv, self.key, self._value(), self.revision)
        except KeyNotFoundError:
            raise Conflict(self.key) from None

    async def release(self) -> None:
        if self.revision is None:
            return
        with contextlib.suppress(Exception):  # expired or taken meanwhile: nothing to release
            await self.kv.delete(self.key, last=self.revision)
        self.revision = None


def holders(entries: Iterable[KeyValue.Entry]) -> dict[str, Any]:
    return {e.key: json.loads(e.value or b"{}") for e in entries}
