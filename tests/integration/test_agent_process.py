"""The agent as guests run it: a separate ``guestbus-agent`` process on a pty serial device."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from guestbus.contract import KV_VMS, LinkKind
from guestbus.lab.fleet import LabFleet
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import ServiceHost
from guestbus_rpc_router.service import RouterSettings, RpcRouter
from guestbus_serial_bridge.service import SerialBridge
from guestbus_serial_bridge.settings import BridgeSettings


@pytest.fixture
async def stack(nats_server: object, nc: Client) -> AsyncIterator[tuple[Path, Registry]]:
    url = nats_server.url  # type: ignore[attr-defined]
    await provision(nc.jetstream(), 1)
    with tempfile.TemporaryDirectory(prefix="gbp-") as d:
        socks = Path(d)
        router = ServiceHost(RpcRouter(), RouterSettings(nats_url=url, http_port=0))
        bridge = ServiceHost(
            SerialBridge(),
            BridgeSettings(
                nats_url=url,
                http_port=0,
                socket_pattern=str(socks / "{uuid}.serial.1"),
                libvirt_xml_dirs=[],
                scan_interval=0.3,
                bridge_host="proc-test",
            ),
        )
        await router.start()
        await bridge.start()
        try:
            yield socks, Registry(await nc.jetstream().key_value(KV_VMS))
        finally:
            await bridge.stop()
            await router.stop()


async def test_agent_processes_link_over_ptys(stack: tuple[Path, Registry], nc: Client) -> None:
    socks, registry = stack
    async with LabFleet(socks, mode="pty", agents="processes", heartbeat=0.5) as fleet:
        vms = await fleet.add_vms(2)
        want = {vm.uuid for vm in vms}
        for _ in range(200):
            recs = {r.uuid: r for r in await registry.all()}
            if all(u in recs and recs[u].link is LinkKind.SERIAL for u in want):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("agent processes did not link over their ptys")
        for vm in vms:
            assert recs[vm.uuid].host == "proc-test"
            reply = await nc.request(f"gb.guest.{vm.uuid}.ping", b"{}", timeout=5)
            assert json.loads(reply.data)["pong"] is True
        # Each agent is its own process, as in a guest.
        assert all(
            a.process is not None and a.process.returncode is None for a in fleet.agents.values()
        )


def test_agent_with_a_bad_config_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps({"vm_uuid": "5b0c1e2a-1111-4222-8333-944455556666", "gateway_host": "10.0.0.1"})
    )
    out = subprocess.run(
        [sys.executable, "-m", "guestbus_agent.main", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "missing required field 'config_uuid'" in out.stderr
    assert "Traceback" not in out.stderr
