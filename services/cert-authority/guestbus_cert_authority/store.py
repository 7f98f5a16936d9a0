"""The CA's state in the JetStream KV bucket ``gb_certs``.

Keys (constants in :mod:`guestbus.contract`, block "certificates"):

- ``ca.cert`` / ``ca.key``: the CA certificate and its encrypted private key, each written
  once with ``create`` (so concurrent first starts end with one CA);
- ``cert.<serial>``: one :class:`CertRecord` per certificate, created with ``create`` (a serial
  collision is detected, never overwritten), changed by compare-and-set;
- ``pem.<serial>``: the certificate (PEM), kept apart so that listing reads records only;
- ``vm.<uuid>``: a VM's newest certificates (serial, not_after, revoked), compare-and-set;
- ``crl``: the current :class:`CrlState`, replaced by compare-and-set (the CRL number grows).

Listing reads every record with ONE scan of ``cert.>``, never a get per key.
"""

from __future__ import annotations

import asyncio
import random
import weakref
from collections.abc import Callable

from nats.errors import NoRespondersError
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from guestbus.contract import (
    CERTS_KEY_CRL,
    CERTS_PREFIX_PEM,
    CERTS_PREFIX_RECORD,
    CERTS_PREFIX_VM,
    CertRecord,
    CrlState,
    VmCertIndex,
)
from guestbus.kvscan import kv_scan

VM_INDEX_MAX = 16
GET_ATTEMPTS = 6
"""Serials kept per VM in ``vm.<uuid>`` (the newest)."""


class Conflict(Exception):
    """A compare-and-set lost against a concurrent writer."""


def is_conflict(exc: BaseException) -> bool:
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    return "wrong last sequence" in str(exc).lower()


class CertStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._vm_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # --- plain values ---------------------------------------------------------------

    async def get(self, key: str) -> tuple[bytes | None, int | None]:
        """``(value, revision)``; ``(None, None)`` when missing, ``(None, rev)`` when deleted.

        A read that finds no responder (the stream's direct-get responders are set up
        asynchronously, e.g. right after the bucket was created) is retried briefly.
        """
        for attempt in range(GET_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
            except KeyDeletedError as exc:
                return None, exc.entry.revision if exc.entry is not None else None
            except KeyNotFoundError:
                return None, None
            except NoRespondersError:
                if attempt == GET_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            return entry.value or None, entry.revision
        raise AssertionError("unreachable")  # pragma: no cover

    async def create(self, key: str, value: bytes) -> bool:
        """Write ``key`` only if it does not exist; False when it does."""
        try:
            await self.kv.create(key, value)
        except Exception as exc:
            if is_conflict(exc):
                return False
            raise
        return True

    async def update(self, key: str, value: bytes, revision: int | None) -> None:
        """Compare-and-set (``revision`` None: create); :class:`Conflict` when it lost."""
        try:
            if revision is None:
                await self.kv.create(key, value)
            else:
                await self.kv.update(key, value, last=revision)
        except Exception as exc:
            if is_conflict(exc):
                raise Conflict(key) from None
            raise

    # --- certificate records ----------------------------------------------------------

    async def get_record(self, serial: str) -> tuple[CertRecord | None, int | None]:
        raw, revision = await self.get(CERTS_PREFIX_RECORD + serial)
        if raw is None:
            return None, revision
        return CertRecord.model_validate_json(raw), revision

    async def create_record(self, record: CertRecord) -> bool:
        """False when a record with this serial exists (a collision: pick another serial)."""
        return await self.create(
            CERTS_PREFIX_RECORD + record.serial, record.model_dump_json().encode()
        )

    async def update_record(self, record: CertRecord, revision: int) -> None:
        await self.update(
            CERTS_PREFIX_RECORD + record.serial, record.model_dump_json().encode(), revision
        )

    async def put_pem(self, serial: str, pem: str) -> None:
        await self.kv.put(CERTS_PREFIX_PEM + serial, pem.encode("ascii"))

    async def get_pem(self, serial: str) -> str | None:
        raw, _ = await self.get(CERTS_PREFIX_PEM + serial)
        return raw.decode("ascii") if raw else None

    async def purge(self, serial: str) -> None:
        await self.kv.purge(CERTS_PREFIX_RECORD + serial)
        await self.kv.purge(CERTS_PREFIX_PEM + serial)

    async def scan(self) -> dict[str, CertRecord]:
        """Every certificate record, by serial: one scan of ``cert.>`` (:mod:`guestbus.kvscan`)."""
        found = await kv_scan(self.kv, CERTS_PREFIX_RECORD + ">")
        validate = CertRecord.model_validate_json
        records = (validate(item.value) for item in found.values() if item.value)
        return {rec.serial: rec for rec in records}

    # --- per-VM index ----------------------------------------------------------------------

    async def get_index(self, vm: str) -> tuple[VmCertIndex, int | None]:
        raw, revision = await self.get(CERTS_PREFIX_VM + vm)
        return (VmCertIndex.model_validate_json(raw) if raw else VmCertIndex()), revision

    async def change_index(
        self,
        vm: str,
        change: Callable[[VmCertIndex], VmCertIndex | None],
        known: tuple[VmCertIndex, int | None] | None = None,
        attempts: int = 20,
    ) -> None:
        """Apply ``change`` to the VM's index by compare-and-set (``known``: a value and
        revision already read, tried first). Changes to one VM take turns within this
        process, so only other replicas can make it retry."""
        lock = self._vm_locks.get(vm)
        if lock is None:
            lock = self._vm_locks[vm] = asyncio.Lock()
        key = CERTS_PREFIX_VM + vm
        async with lock:
            for attempt in range(attempts):
                index, revision = known if known is not None else await self.get_index(vm)
                known = None
                new = change(index)
                if new is None:
                    return
                try:
                    await self.update(key, new.model_dump_json().encode(), revision)
                    return
                except Conflict:
                    await asyncio.sleep(random.uniform(0.001, 0.004) * (attempt + 1))
        raise Conflict(key)

    # --- CRL -------------------------------------------------------------------------------

    async def get_crl(self) -> tuple[CrlState | None, int | None]:
        raw, revision = await self.get(CERTS_KEY_CRL)
        if raw is None:
            return None, revision
        return CrlState.model_validate_json(raw), revision

    async def write_crl(self, state: CrlState, revision: int | None) -> None:
        """Compare-and-set the CRL; :class:`Conflict` when another replica wrote first."""
        await self.update(CERTS_KEY_CRL, state.model_dump_json().encode(), revision)
