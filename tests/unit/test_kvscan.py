"""guestbus.kvscan on a real nats-server: every live key exactly, scan after scan.

A scan that stops at nats-py's "end of initial values" marker can return nothing (the
marker may come first); these tests repeat the scan so that such a race shows, and fail on
any key deleted, purged or missing — also while keys are rewritten faster than the bucket
keeps history (values the scan was about to read are removed under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from guestbus.kvscan import KvItem, kv_keys, kv_scan

SCANS = 20


@pytest.fixture
async def kv(nc: Client) -> AsyncIterator[KeyValue]:
    """A new bucket keeping 5 values per key (the scan must return the newest)."""
    async with bucket(nc, history=5) as store:
        yield store


@contextlib.asynccontextmanager
async def bucket(nc: Client, history: int) -> AsyncIterator[KeyValue]:
    js = nc.jetstream()
    name = f"scan_{secrets.token_hex(4)}"
    store = await js.create_key_value(KeyValueConfig(bucket=name, history=history))
    try:
        yield store
    finally:
        await js.delete_key_value(name)


async def in_chunks(calls: list[Awaitable[object]], size: int = 200) -> None:
    for i in range(0, len(calls), size):
        await asyncio.gather(*calls[i : i + size])


async def consumers(kv: KeyValue) -> int:
    return (await kv._js.stream_info(kv._stream)).state.consumer_count


async def test_every_live_key_with_its_newest_value(kv: KeyValue) -> None:
    await in_chunks([kv.put(f"cert.{i:04}", b"v1-%d" % i) for i in range(2000)])
    await in_chunks([kv.put(f"vm.{i}", b"vm") for i in range(50)])
    await in_chunks([kv.delete(f"cert.{i:04}") for i in range(0, 2000, 7)])
    await in_chunks([kv.purge(f"cert.{i:04}") for i in range(3, 2000, 11)])
    await in_chunks([kv.put(f"cert.{i:04}", b"v2-%d" % i) for i in range(1, 2000, 5)])
    await kv.put("cert.0000", b"back")  # deleted, then written again
    await kv.delete("vm.0")

    gone = set(range(0, 2000, 7)) | set(range(3, 2000, 11))
    certs: dict[str, bytes] = {}
    for i in range(2000):
        if i % 5 == 1:
            certs[f"cert.{i:04}"] = b"v2-%d" % i
        elif i not in gone:
            certs[f"cert.{i:04}"] = b"v1-%d" % i
    certs["cert.0000"] = b"back"
    everything = {**certs, **{f"vm.{i}": b"vm" for i in range(1, 50)}}

    for _ in range(SCANS):
        found = await kv_scan(kv)
        assert {k: item.value for k, item in found.items()} == everything
        assert set(await kv_keys(kv)) == set(everything)
        assert {k: item.value for k, item in (await kv_scan(kv, "cert.>")).items()} == certs
    assert await kv_keys(kv, "vm.*") == sorted(f"vm.{i}" for i in range(1, 50))

    # revisions are the stream sequences of the newest values
    item = found["cert.0001"]
    assert isinstance(item, KvItem) and item.revision == (await kv.get("cert.0001")).revision
    assert found["cert.0000"].revision == (await kv.get("cert.0000")).revision
    assert await consumers(kv) == 0  # every scan removed its consumer


async def test_an_empty_bucket_or_filter_is_an_empty_result(kv: KeyValue) -> None:
    assert await kv_scan(kv) == {}
    assert await kv_keys(kv) == []
    await kv.put("vm.a", b"x")
    await kv.delete("vm.a")
    await kv.put("vm.b", b"y")
    await kv.purge("vm.b")
    assert await kv_scan(kv) == {}
    await kv.put("vm.c", b"z")
    assert await kv_scan(kv, "cert.>") == {}
    assert list(await kv_scan(kv)) == ["vm.c"]
    assert await consumers(kv) == 0


async def test_values_removed_while_the_scan_reads(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # history 1: rewriting a key while the scan reads removes the value its consumer was
    # going to deliver, and the server's pending count drifts (it can say 0 too early)
    async with bucket(nc, history=1) as kv:
        keys = [f"k.{i:03}" for i in range(600)]
        for i in range(0, len(keys), 100):  # stream order = key order
            await in_chunks([kv.put(k, b"0") for k in keys[i : i + 100]])
        fetch = JetStreamContext.PullSubscription.fetch
        fetched = 0

        async def fetch_then_rewrite(
            sub: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any
        ) -> list[Msg]:
            nonlocal fetched
            msgs = await fetch(sub, *args, **kwargs)
            fetched += 1
            if fetched == 1:  # some read, the rest not yet
                await in_chunks([kv.put(k, b"1") for k in keys[::3]])
            return msgs

        monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch_then_rewrite)
        found = await kv_scan(kv)
        assert fetched > 0
        assert sorted(found) == keys
        assert {k for k, item in found.items() if item.value == b"1"} >= set(keys[300::3])
        assert await consumers(kv) == 0


async def test_keys_being_rewritten_all_along_are_never_missing(nc: Client) -> None:
    # a writer as fast as it can go, on a third of the keys, history 1: values are removed
    # under the scan all the time, and the scan does not chase the writer either
    async with bucket(nc, history=1) as kv:
        keys = [f"k.{i:03}" for i in range(300)]
        await in_chunks([kv.put(k, b"0") for k in keys])
        stop = asyncio.Event()

        async def rewrite() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await asyncio.gather(*(kv.put(k, b"%d" % n) for k in keys[n % 3 :: 3]))

        writer = asyncio.ensure_future(rewrite())
        try:
            for _ in range(SCANS):
                assert sorted(await asyncio.wait_for(kv_scan(kv), 20)) == keys
        finally:
            stop.set()
            await writer
