"""The whole chain as a guest lives it, short of a real VM: iso-builder makes a VM's full ISO,
an independent reader (xorriso) unpacks it as a mount would, the ISO's own installer installs
the agent offline into a scratch root, and that agent — on a lab VM's serial device — links
up through a real serial-bridge and rpc-router with the identity the ISO carried."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guestbus.contract import LinkKind, VmRecord
from guestbus.lab.hypervisor import LabHypervisor
from guestbus_iso_builder.wheelhouse import Wheelhouse
from guestbus_rpc_router.service import RouterSettings, RpcRouter

from ._support import IsoEnv, xorriso_extract
from .test_installer import ok, run_install

HOST = "chain-host"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[IsoEnv]:
    environment = await IsoEnv(tmp_path, iso_heartbeat_interval=0.5).start()
    try:
        yield environment
    finally:
        await environment.close()


async def test_iso_to_installed_agent_on_the_serial_link(
    env: IsoEnv, wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="gbchain-"))  # short: sun_path is 108 bytes
    async with LabHypervisor(sockets, mode="pty") as hypervisor:
        lab_vm = await hypervisor.add_vm()
        vm = lab_vm.uuid
        await env.host(
            RpcRouter(),
            RouterSettings(
                nats_url=env.url,
                http_port=0,
                heartbeat_interval=0.5,
                tls_port=0,
                shutdown_timeout=5,
                event_loop="asyncio",
                log_level="WARNING",
            ),
            "gb.rpc.hello",
        )
        await env.bridge(HOST, pattern=str(sockets / "{uuid}.serial.1"))

        # the bridge discovered the VM, so iso-builder knows it: build its full ISO
        async def discovered() -> bool:
            return (await env.registry.get(vm))[0] is not None

        await _wait(discovered, 10, "the bridge to record the VM")
        reply = await env.call("build", {"vms": [vm], "kind": "full"}, timeout=600)
        assert reply["built"] == 1, reply
        manifest = reply["results"][0]["manifest"]

        # a guest mounts it; the installer on it installs offline into the guest's root
        media = xorriso_extract(env.out_dir / f"{vm}.iso", tmp_path / "media")
        root = tmp_path / "guest"
        root.mkdir()
        out = ok(await asyncio.to_thread(run_install, media, root))
        assert f"took config {manifest['config_uuid']} #1" in out

        # the installed agent, started as its unit starts it, on the VM's serial device
        state = root / "var/lib/guestbus"
        agent = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [
                str(root / "opt/guestbus/venv/bin/guestbus-agent"),
                "--config",
                str(root / "etc/guestbus/config.json"),
                "--state-dir",
                str(state),
                "--device",
                str(lab_vm.device_path),
                "--no-iso",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        try:

            async def on_serial() -> bool:
                record, _ = await env.registry.get(vm)
                return record is not None and record.link is LinkKind.SERIAL

            await _wait(on_serial, 30, "the installed agent's serial link", agent)
            record, _ = await env.registry.get(vm)
            assert isinstance(record, VmRecord)
            assert record.host == HOST
            assert record.agent_version == wheelhouse.agent_version
            assert record.config_uuid == manifest["config_uuid"]
            msg = await env.nc.request(f"gb.guest.{vm}.ping", b"{}", timeout=5)
            assert json.loads(msg.data)["pong"] is True

            # it runs with the ISO's identity: no enrollment, the one certificate is the ISO's
            msg = await env.nc.request("gb.ca.list", json.dumps({"vm": vm}).encode(), timeout=5)
            serials = [c["serial"] for c in json.loads(msg.data)["certificates"]]
            assert serials == [manifest["cert_serial"]]
            assert (state / "tls/client.crt").read_bytes() == (media / "client.crt").read_bytes()
        finally:
            agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(10)
            if agent.poll() is None:
                agent.kill()
            assert agent.stderr is not None
            agent.stderr.close()


async def _wait(check: object, timeout: float, what: str, proc: object = None) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    detail = ""
    if isinstance(proc, subprocess.Popen) and proc.poll() is not None and proc.stderr:
        detail = "\nagent stderr:\n" + proc.stderr.read().decode(errors="replace")
    raise AssertionError(f"timed out waiting for {what}{detail}")
