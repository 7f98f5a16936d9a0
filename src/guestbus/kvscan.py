"""Read every key of a KV bucket at once: the newest value per key, exactly.

Why not ``kv.watch()`` / ``kv.keys()`` and stop at the ``None`` "end of initial values"
marker? nats-py (2.16) asks consumer_info() right after subscribing; when the server has
already pushed every message (num_pending 0) but the callback has processed none yet, it
queues the marker FIRST, and such a scan returns nothing (a CA that "has" 0 certificates).

Here: an ephemeral **pull** consumer on ``KV_<bucket>`` (deliver last per subject, no acks).
Nothing is delivered before the first fetch, so the num_pending of its creation is the number
of keys (deleted ones included), and that many messages are fetched. That holds while the
stream removes no message: a key rewritten more often than the bucket's history during the
scan loses the value the consumer was about to deliver, and removals make the server's
num_pending drift (seen with nats-server 2.15: 0 while messages were still to come). So when
the stream lost messages during the scan, or fewer came than expected, the keys read are
checked against the stream's subjects, and a key not read is read on its own (direct get).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Mapping
from typing import NamedTuple

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamState
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

BATCH = 256
FETCH_TIMEOUT = 2.0
"""A fetch that gets nothing for this long ends the reading (the key list check follows)."""
INACTIVE_THRESHOLD = 30.0
"""The consumer is deleted after the scan; should that fail, the server drops it after this."""
MARKER_REASON = "Nats-Marker-Reason"
"""nats-server 2.11+: a delete marker the server placed (TTL, max age) has this header."""


class KvItem(NamedTuple):
    value: bytes
    revision: int


async def kv_scan(kv: KeyValue, keys: str = ">", *, values: bool = True) -> dict[str, KvItem]:
    """The newest value and revision of every live key matching ``keys`` (``>``: all).

    ``values=False`` reads headers only (every value is ``b""``): for listing keys.
    A key whose newest value is empty but not a delete is included (with ``b""``).
    """
    js, stream, prefix = kv._js, kv._stream, kv._pre
    before = (await js.stream_info(stream)).state
    out, seen, complete = await _read(js, stream, prefix, keys, values)
    after = (await js.stream_info(stream)).state
    if complete and _removed(before, after) == 0:
        return out
    subjects = await _subjects(js, stream, prefix + keys)
    missing = [subject for subject in subjects if subject[len(prefix) :] not in seen]
    for i in range(0, len(missing), BATCH):
        chunk = missing[i : i + BATCH]
        got = await asyncio.gather(*(_last(js, stream, s, kv._direct) for s in chunk))
        for subject, item in zip(chunk, got):
            if item is not None:
                out[subject[len(prefix) :]] = item if values else KvItem(b"", item.revision)
    return out


async def kv_keys(kv: KeyValue, keys: str = ">") -> list[str]:
    """The live keys matching ``keys``, sorted (unlike ``kv.keys()``: exact, [] when none)."""
    return sorted(await kv_scan(kv, keys, values=False))


async def _read(
    js: JetStreamContext, stream: str, prefix: str, keys: str, values: bool
) -> tuple[dict[str, KvItem], set[str], bool]:
    """Live keys read, every key read (deletes too), and whether all expected ones came."""
    name = f"scan_{secrets.token_hex(8)}"
    config = ConsumerConfig(
        name=name,
        filter_subject=prefix + keys,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        headers_only=None if values else True,
        inactive_threshold=INACTIVE_THRESHOLD,
        mem_storage=True,
    )
    expected = (await js.add_consumer(stream, config)).num_pending or 0
    out: dict[str, KvItem] = {}
    seen: set[str] = set()
    read = 0
    try:
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            pending = expected
            while read < expected and pending > 0:
                try:
                    msgs = await sub.fetch(min(expected - read, BATCH), timeout=FETCH_TIMEOUT)
                except TimeoutError:
                    break
                for msg in msgs:
                    meta = msg.metadata
                    key = msg.subject[len(prefix) :]
                    seen.add(key)
                    if _deleted(msg.headers):
                        out.pop(key, None)
                    else:
                        out[key] = KvItem(msg.data, meta.sequence.stream)
                    pending = meta.num_pending
                read += len(msgs)
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):  # gone already, or the connection is: it expires
            await js.delete_consumer(stream, name)
    return out, seen, read >= expected


def _removed(before: StreamState, after: StreamState) -> int:
    """Messages the stream lost between two looks (superseded beyond history, expired,
    purged): the ones appended minus the growth."""
    return (after.last_seq - before.last_seq) - (after.messages - before.messages)


async def _subjects(js: JetStreamContext, stream: str, subjects: str) -> list[str]:
    """Every subject of ``stream`` matching ``subjects`` that holds a message (paged)."""
    found: list[str] = []
    while True:
        request = {"subjects_filter": subjects, "offset": len(found)}
        resp = await js._api_request(
            f"{js._prefix}.STREAM.INFO.{stream}", json.dumps(request).encode()
        )
        page = list((resp.get("state") or {}).get("subjects") or {})
        found += page
        if not page or len(found) >= int(resp.get("total") or 0):
            return found


async def _last(js: JetStreamContext, stream: str, subject: str, direct: bool) -> KvItem | None:
    """The newest value of one key (None: deleted, or gone meanwhile)."""
    try:
        msg = await js.get_msg(stream, subject=subject, direct=direct)
    except NotFoundError:
        return None
    return None if _deleted(msg.headers) else KvItem(msg.data or b"", msg.seq or 0)


def _deleted(headers: Mapping[str, str] | None) -> bool:
    """A delete or purge marker: written by a client, or placed by the server."""
    if not headers:
        return False
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or MARKER_REASON in headers
