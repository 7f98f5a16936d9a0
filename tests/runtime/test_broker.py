"""The embedded broker and JetStream provisioning."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from guestbus.broker import BrokerError, EmbeddedBroker, find_nats_server
from guestbus.contract import (
    KV_CERTS,
    KV_DR_KEYS,
    KV_DR_PLANS,
    KV_DR_RUNS,
    KV_ISO_MANIFESTS,
    KV_LEASES,
    KV_RESTORES,
    KV_SNAPSHOTS,
    KV_VMS,
    LEASE_TTL_SECONDS,
    OBJ_ISOS,
    STREAM_EVENTS,
    STREAM_EVENTS_SUBJECTS,
)
from guestbus.provision import provision
from guestbus.runtime.procs import pid_alive

BUCKETS = (
    KV_VMS,
    KV_CERTS,
    KV_DR_PLANS,
    KV_DR_RUNS,
    KV_LEASES,
    KV_ISO_MANIFESTS,
    KV_DR_KEYS,
    KV_SNAPSHOTS,
    KV_RESTORES,
)


async def test_broker_start_provision_stop(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "state", port=0, monitor_port=0)
    await broker.start()
    pid = broker.pid
    assert pid is not None and pid_alive(pid)
    try:
        assert broker.url.startswith("nats://127.0.0.1:")
        assert broker.monitor_url is not None
        assert (tmp_path / "state" / "nats-server.conf").is_file()
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        summary = await provision(js, replicas=1)
        assert {r.action for r in summary.resources} == {"created"}
        assert summary.names("kv") == list(BUCKETS)

        info = await js.stream_info(STREAM_EVENTS)
        assert info.config.subjects == [STREAM_EVENTS_SUBJECTS]
        assert info.config.storage == "file"
        assert info.config.max_age == pytest.approx(7 * 24 * 3600)
        assert info.config.max_bytes is not None and info.config.max_bytes > 0
        for bucket in BUCKETS:
            kv = await js.key_value(bucket)
            assert (await kv.status()).bucket == bucket
        leases = await js.stream_info(f"KV_{KV_LEASES}")
        assert leases.config.max_age == pytest.approx(LEASE_TTL_SECONDS)
        await js.object_store(OBJ_ISOS)

        # events published on gb.evt.> are captured
        ack = await js.publish("gb.evt.link.up.vm1", b"{}")
        assert ack.stream == STREAM_EVENTS

        # idempotent; an operator's drift is corrected
        again = await provision(js, replicas=1)
        assert {r.action for r in again.resources} == {"unchanged"}
        await js.update_stream(info.config.evolve(max_age=3600.0))
        fixed = await provision(js, replicas=1)
        actions = {r.name: r.action for r in fixed.resources}
        assert actions[STREAM_EVENTS] == "updated"
        assert (await js.stream_info(STREAM_EVENTS)).config.max_age == pytest.approx(7 * 86400)
        assert (await js.stream_info(STREAM_EVENTS)).state.messages == 1
        await nc.close()
    finally:
        assert await broker.stop() == 0
    assert not pid_alive(pid)
    assert not broker.running
    assert list((tmp_path / "state" / "run").glob("*.ports")) == []


async def test_broker_state_survives_restart(tmp_path: Path) -> None:
    async with EmbeddedBroker(tmp_path, port=0, monitor_port=None) as broker:
        nc = await nats.connect(broker.url)
        await provision(nc.jetstream())
        kv = await nc.jetstream().key_value(KV_VMS)
        await kv.put("vm-1", b"registered")
        await nc.close()
    async with EmbeddedBroker(tmp_path, port=0, monitor_port=None) as broker:
        nc = await nats.connect(broker.url)
        kv = await nc.jetstream().key_value(KV_VMS)
        assert (await kv.get("vm-1")).value == b"registered"
        await nc.close()


def test_broker_failure_reports_server_output(tmp_path: Path) -> None:
    first = EmbeddedBroker(tmp_path / "a", port=0, monitor_port=None)
    first.start_sync()
    try:
        second = EmbeddedBroker(tmp_path / "b", port=first.port, monitor_port=None)
        with pytest.raises(BrokerError, match="address already in use"):
            second.start_sync()
        assert not second.running
    finally:
        first.stop_sync()


def test_find_nats_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert find_nats_server().name == "nats-server"
    monkeypatch.setenv("GUESTBUS_NATS_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(BrokerError, match="not an executable"):
        find_nats_server()
