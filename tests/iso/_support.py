"""The ISO tests' environment: a real nats-server, the cert-authority and iso-builder running
in-process, VMs in the registry as a serial-bridge would record them, and independent ISO
readers (isoinfo from genisoimage, xorriso, pycdlib)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import nats
import pycdlib
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext

from guestbus.broker import EmbeddedBroker
from guestbus.contract import KV_VMS, VmRecord, iso_subject
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import ServiceHost, check_reply
from guestbus_cert_authority.service import CertAuthority
from guestbus_cert_authority.settings import CaSettings
from guestbus_iso_builder.service import IsoBuilder
from guestbus_iso_builder.settings import IsoSettings
from guestbus_serial_bridge.service import SerialBridge
from guestbus_serial_bridge.settings import BridgeSettings

from .conftest import wheelhouse_cache_dir

GATEWAY = "gw.example.test"


def tool(name: str) -> str:
    """An independent ISO reader; its absence fails the test (it is part of the test)."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install genisoimage xorriso")
    return found


def isoinfo(path: Path, *args: str) -> str:
    return subprocess.run(
        [tool("isoinfo"), "-i", str(path), *args], check=True, capture_output=True, text=True
    ).stdout


def xorriso_extract(path: Path, dest: Path) -> Path:
    """Extract with Rock Ridge permissions, as a Linux mount would show them."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [tool("xorriso"), "-osirrox", "on", "-indev", str(path), "-extract", "/", str(dest)],
        check=True,
        capture_output=True,
    )
    return dest


def pycdlib_read(path: Path, rr_path: str) -> tuple[bytes, int]:
    """A file's bytes and Rock Ridge mode, read with pycdlib."""
    import io

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=rr_path)
        record = iso.get_record(rr_path=rr_path)
        rock_ridge = getattr(record, "rock_ridge", None)
        assert rock_ridge is not None, f"{rr_path} has no Rock Ridge entry"
        return out.getvalue(), int(rock_ridge.get_file_mode())
    finally:
        iso.close()


class IsoEnv:
    def __init__(self, tmp: Path, **iso_overrides: Any) -> None:
        self.tmp = tmp
        self.iso_overrides = iso_overrides
        self.broker = EmbeddedBroker(tmp / "broker", port=0, monitor_port=None)
        self.nc: Client
        self.js: JetStreamContext
        self.hosts: list[ServiceHost] = []
        self.out_dir = tmp / "isos"
        self.ca_host: ServiceHost | None = None

    @property
    def url(self) -> str:
        return self.broker.url

    async def start(self) -> IsoEnv:
        await self.broker.start()
        self.nc = await nats.connect(self.url, name="iso-tests")
        self.js = self.nc.jetstream()
        await provision(self.js, 1)
        self.registry = Registry(await self.js.key_value(KV_VMS))
        self.ca_host = await self._host(
            CertAuthority(),
            CaSettings(
                nats_url=self.url,
                http_port=0,
                state_dir=self.tmp / "ca",
                ca_passphrase="iso tests passphrase",
                ca_scan_interval=3600,
                shutdown_timeout=5,
                log_level="WARNING",
                event_loop="asyncio",
            ),
            "gb.ca.info",
        )
        await self._host(IsoBuilder(), self.iso_settings(), iso_subject("info"))
        return self

    def iso_settings(self, **overrides: Any) -> IsoSettings:
        values: dict[str, Any] = {
            "nats_url": self.url,
            "http_port": 0,
            "state_dir": self.tmp / "iso-builder",
            "iso_output_dir": self.out_dir,
            "iso_gateway_host": GATEWAY,
            "iso_wheel_cache": wheelhouse_cache_dir(),
            "shutdown_timeout": 5,
            "log_level": "WARNING",
            "event_loop": "asyncio",
        }
        values.update(self.iso_overrides)
        values.update(overrides)
        return IsoSettings(**values)

    async def host(self, service: Any, settings: Any, probe: str) -> ServiceHost:
        """Start another service in-process and wait until ``probe`` has a responder."""
        return await self._host(service, settings, probe)

    async def _host(self, service: Any, settings: Any, probe: str) -> ServiceHost:
        host = ServiceHost(service, settings)
        await host.start()
        self.hosts.append(host)
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while True:
            try:
                await self.nc.request(probe, b"{}", timeout=2)
                return host
            except NoRespondersError:
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.02)

    async def bridge(
        self, host: str, *, pattern: str = "", xml_dirs: list[str] | None = None
    ) -> None:
        """A serial-bridge in-process: sockets by ``pattern`` and/or libvirt XML dirs."""
        settings = BridgeSettings(
            nats_url=self.url,
            http_port=0,
            socket_pattern=pattern,
            libvirt_xml_dirs=xml_dirs or [],
            bridge_host=host,
            scan_interval=0.2,
            shutdown_timeout=5,
            event_loop="asyncio",
            log_level="WARNING",
        )
        await self._host(SerialBridge(), settings, "$SRV.PING.serial-bridge")

    async def add_vms(self, count: int, name_prefix: str = "vm") -> list[str]:
        """VMs as a serial-bridge records them when it discovers their sockets."""
        vms = [str(uuid.uuid4()) for _ in range(count)]

        async def add(i: int, vm: str) -> None:
            record = VmRecord(uuid=vm, name=f"{name_prefix}-{i}", host="test-host")
            await self.registry.kv.put(vm, record.model_dump_json().encode())

        await asyncio.gather(*(add(i, vm) for i, vm in enumerate(vms)))
        return vms

    async def call(self, endpoint: str, body: dict[str, Any], timeout: float = 120) -> Any:
        msg = await self.nc.request(
            iso_subject(endpoint), json.dumps(body).encode(), timeout=timeout
        )
        return json.loads(check_reply(msg.headers, msg.data))

    async def close(self) -> None:
        for host in reversed(self.hosts):
            await host.stop()
        if not self.nc.is_closed:
            await self.nc.close()
        await self.broker.stop()
