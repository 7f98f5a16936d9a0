"""The VM registry in the JetStream KV bucket ``gb_vms``: one :class:`VmRecord` per uuid.

rpc-router replicas write it concurrently, so every change is a compare-and-set on the
entry's revision, retried on conflict; nothing is kept only in memory. Within one process,
changes to the same entry take turns (a burst of RPCs from one VM would otherwise spend its
retries colliding with itself).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from guestbus.contract import VmRecord
from guestbus.kvscan import kv_scan

Mutator = Callable[[VmRecord], VmRecord | None]


class Registry:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, uuid: str) -> asyncio.Lock:
        lock = self._locks.get(uuid)
        if lock is None:
            lock = self._locks[uuid] = asyncio.Lock()
        return lock

    async def get(self, uuid: str) -> tuple[VmRecord | None, int | None]:
        try:
            entry = await self.kv.get(uuid)
        except KeyNotFoundError:
            return None, None
        if entry.value is None:
            return None, entry.revision
        return VmRecord.model_validate_json(entry.value), entry.revision

    async def change(self, uuid: str, mutate: Mutator, attempts: int = 8) -> VmRecord | None:
        """Apply ``mutate`` (given the current or a fresh record) atomically.

        ``mutate`` returns the new record, or None to leave the entry as it is.
        """
        async with self._lock(uuid):
            return await self._change(uuid, mutate, attempts)

    async def _change(self, uuid: str, mutate: Mutator, attempts: int) -> VmRecord | None:
        for attempt in range(attempts):
            current, revision = await self.get(uuid)
            base = current if current is not None else VmRecord(uuid=uuid)
            new = mutate(base)
            if new is None:
                return current
            data = new.model_dump_json().encode()
            try:
                if revision is None:
                    await self.kv.create(uuid, data)
                else:
                    await self.kv.update(uuid, data, last=revision)
                return new
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.002 * (attempt + 1))
            except Exception as exc:  # create() on an existing key raises a JetStream API error
                if "wrong last sequence" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.002 * (attempt + 1))
        raise RuntimeError(f"registry entry {uuid} changed concurrently {attempts} times in a row")

    async def all(self) -> list[VmRecord]:
        """A snapshot of every record, by name then uuid (one scan, no per-key round trips;
        see :mod:`guestbus.kvscan`). Deleted and empty entries are not records."""
        found = await kv_scan(self.kv)
        records = [
            VmRecord.model_validate_json(item.value) for item in found.values() if item.value
        ]
        return sorted(records, key=lambda r: ((r.name or "~"), r.uuid))
