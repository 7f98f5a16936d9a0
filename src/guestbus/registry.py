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

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from guestbus.contract import VmRecord

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
        """A snapshot of every record (one watch, no per-key round trips).

        While entries change, the watch's initial values (one per key) can list a key twice
        (old value, then new) or skip one whose new value only follows the end-of-initial-
        values marker. So the newest value of each key wins, deletes remove it, and reading
        goes on past the marker up to the bucket's last sequence at that moment.
        """
        latest: dict[str, VmRecord] = {}
        newest = 0
        end: int | None = None
        watcher = await self.kv.watchall(include_history=False)
        try:
            while end is None or newest < end:
                try:  # after the marker: if the last message is gone, nothing newer is missing
                    entry = await watcher.updates(  # type: ignore[no-untyped-call]
                        timeout=None if end is None else 2.0
                    )
                except NatsTimeoutError:
                    break
                if entry is None:
                    state = (await self.kv.status()).stream_info.state
                    end = state.last_seq if state.messages else 0
                    continue
                if not isinstance(entry, KeyValue.Entry):  # the watcher stopped
                    break
                newest = max(newest, entry.revision or 0)
                if entry.value and entry.operation not in (KV_DEL, KV_PURGE):
                    latest[entry.key] = VmRecord.model_validate_json(entry.value)
                else:
                    latest.pop(entry.key, None)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(latest.values(), key=lambda r: ((r.name or "~"), r.uuid))
