"""Helpers for the cert-authority tests: a broker per environment, CA hosts, requests."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import nats
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from pydantic import BaseModel

from guestbus import pki
from guestbus.broker import EmbeddedBroker
from guestbus.contract import ca_subject
from guestbus.provision import provision
from guestbus.runtime import ServiceHost, check_reply
from guestbus_cert_authority.service import CertAuthority
from guestbus_cert_authority.settings import CaSettings

PASSPHRASE = "correct horse battery staple"
_KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
_ids = itertools.count()


def new_vm() -> str:
    return str(uuid.uuid4())


def ec_key(i: int = 0) -> ec.EllipticCurvePrivateKey:
    """A few pre-generated P-256 keys (key generation is not what these tests measure)."""
    return _KEYS[i % len(_KEYS)]


def vm_csr(vm: str, key: Any = None, trust_domain: str | None = None) -> str:
    return pki.make_csr(key or ec_key(), vm, trust_domain).decode()


class CaEnv:
    """A nats-server of its own (JetStream provisioned), a client, and CA hosts on it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = EmbeddedBroker(tmp / "broker", port=0, monitor_port=None)
        self.hosts: list[ServiceHost] = []
        self.nc: Client
        self.js: JetStreamContext

    @property
    def url(self) -> str:
        return self.broker.url

    async def start(self, provisioned: bool = True) -> CaEnv:
        await self.broker.start()
        self.nc = await nats.connect(self.url, name="ca-tests")
        self.js = self.nc.jetstream()
        if provisioned:
            await provision(self.js, 1)
        return self

    def settings(self, **overrides: Any) -> CaSettings:
        values: dict[str, Any] = {
            "nats_url": self.url,
            "http_port": 0,
            "state_dir": self.tmp / f"ca-{next(_ids)}",
            "ca_passphrase": PASSPHRASE,
            "ca_scan_interval": 3600,
            "shutdown_timeout": 5,
            "log_level": "WARNING",
            "event_loop": "asyncio",
        }
        values.update(overrides)
        return CaSettings(**values)

    async def host(self, **overrides: Any) -> ServiceHost:
        host = ServiceHost(CertAuthority(), self.settings(**overrides))
        self.hosts.append(host)
        await host.start()
        await self._wait_serving()
        return host

    async def _wait_serving(self, timeout: float = 5.0) -> None:
        """The test's own connection sees the CA's endpoints (rarely, the very first request
        after start still met no responders on this 2-core machine)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                await self.nc.request("gb.ca.info", b"{}", timeout=1)
                return
            except NoRespondersError:
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.02)

    async def stop_host(self, host: ServiceHost) -> None:
        await host.stop()
        self.hosts.remove(host)

    async def call(self, endpoint: str, payload: BaseModel | dict[str, Any] | None = None) -> Any:
        """Request ``gb.ca.<endpoint>``; the decoded JSON reply, or a raised BusError."""
        if isinstance(payload, BaseModel):
            data = payload.model_dump_json().encode()
        else:
            data = json.dumps(payload or {}).encode()
        msg = await self.nc.request(ca_subject(endpoint), data, timeout=10)
        return json.loads(check_reply(msg.headers, msg.data))

    async def issue(self, vm: str | None = None, **fields: Any) -> dict[str, Any]:
        vm = vm or new_vm()
        body: dict[str, Any] = {"csr": vm_csr(vm), "vm": vm}
        body.update(fields)
        result: dict[str, Any] = await self.call("issue", body)
        return result

    async def close(self) -> None:
        for host in reversed(self.hosts):
            await host.stop()
        self.hosts.clear()
        if not self.nc.is_closed:
            await self.nc.close()
        await self.broker.stop()


def service_of(host: ServiceHost) -> CertAuthority:
    assert isinstance(host.service, CertAuthority)
    return host.service


def load(pem: str) -> x509.Certificate:
    return pki.load_pem_certificate(pem)
