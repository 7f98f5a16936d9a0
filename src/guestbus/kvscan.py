"""Read every key of a KV bucket at once: the newest value per key, exactly.

Why not ``kv.watch()`` / ``kv.keys()`` and stop at the ``None`` "end of initial values"
marker? nats-py (2.16) asks consumer_info() right after subscribing; when the server has
already pushed every message (num_pending 0) but the callback has processed none yet, it
queues the marker FIRST, and such a scan returns nothing (a CA that "has" 0 certificates).

Here: an ephemeral **pull** consumer on ``KV_<bucket>`` (deliver last per subject, no acks).
Nothing is delivered before the first fetch, so its num_pending right after creation is
exact: 0 means an empty result; otherwise fetch until a message says num_pending 0. Values
written meanwhile are delivered too (the newest wins); deleted and purged keys are absent.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import NamedTuple

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

BATCH = 256
FETCH_TIMEOUT = 5.0
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
    js = kv._js
    stream = kv._stream
    prefix = kv._pre
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
    await js.add_consumer(stream, config)
    out: dict[str, KvItem] = {}
    try:
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            pending = (await sub.consumer_info()).num_pending or 0
            empty_fetches = 0
            while pending > 0:
                try:
                    msgs = await sub.fetch(min(pending, BATCH), timeout=FETCH_TIMEOUT)
                except TimeoutError:
                    # what was pending can be gone (superseded, expired): ask again
                    pending = (await sub.consumer_info()).num_pending or 0
                    empty_fetches += 1
                    if pending and empty_fetches >= 3:
                        raise
                    continue
                empty_fetches = 0
                for msg in msgs:
                    meta = msg.metadata
                    key = msg.subject[len(prefix) :]
                    headers = msg.headers or {}
                    if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or MARKER_REASON in headers:
                        out.pop(key, None)
                    else:
                        out[key] = KvItem(msg.data, meta.sequence.stream)
                    pending = meta.num_pending
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):  # gone already, or the connection is: it expires
            await js.delete_consumer(stream, name)
    return out


async def kv_keys(kv: KeyValue, keys: str = ">") -> list[str]:
    """The live keys matching ``keys``, sorted (unlike ``kv.keys()``: exact, [] when none)."""
    return sorted(await kv_scan(kv, keys, values=False))
