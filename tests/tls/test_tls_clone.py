"""Clones re-identify themselves, and an operator can make an agent renew now.

A clone boots with its template's config and state (same vm_uuid, same key and certificate),
but its serial socket belongs to another VM, and the serial-bridge stamps that VM's uuid on
the hello ack. The clone adopts the stamped identity, enrolls a certificate for it over serial
and writes its new config — no new ISO, no reboot — while the template keeps its own.

``guestbus cert renew <vm>`` (host command ``renew`` on ``gb.guest.<vm>.renew``) makes the
agent renew at once and answers with the new serial.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid as uuidlib
from pathlib import Path

import pytest
from cryptography import x509

from guestbus import pki
from guestbus_agent.config import STATE_CONFIG_NAME, AgentConfig, parse_config
from guestbus_agent.config import load as load_config
from guestbus_agent.identity import Identity

from ..support.waiting import wait_until
from ._support import BRIDGE_HOST, TRUST_DOMAIN, TlsStack, host_command, utcnow
from .conftest import StackFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> TlsStack:
    return await make_stack(heartbeat=0.3)


async def enrolled_vm(stack: TlsStack) -> str:
    vm = await stack.lab.add_vm()
    await wait_until(
        lambda: stack.agent(vm.uuid).enrollments == 1,
        20,
        "the agent to enroll",
        detail=stack.agents_detail,
    )
    await stack.wait_paths([vm.uuid], "serial")
    return vm.uuid


def same_config(stack: TlsStack, vm: str, config_uuid: str, state_dir: Path) -> AgentConfig:
    """The config a template VM's ISO carries; only where its disk is mounted differs."""
    return parse_config(
        {
            "vm_uuid": vm,
            "config_uuid": config_uuid,
            "gateway_host": "127.0.0.1",
            "gateway_port": stack.gateway_port,
            "heartbeat_interval": stack.heartbeat,
            "serial_failure_limit": stack.serial_failure_limit,
            "request_timeout": stack.request_timeout,
            "state_dir": str(state_dir),
        },
        "template ISO",
    )


async def test_clone_with_the_template_config_takes_its_own_identity(stack: TlsStack) -> None:
    # Two VMs, each with its own serial socket; the second is a clone of the first, so both
    # disks hold the same config (vm_uuid = the template's) and the same key and certificate.
    template_vm = await stack.lab.add_vm(agent=False)
    clone_vm = await stack.lab.add_vm(agent=False)
    template_dir = stack.lab.state_root / "template-image"
    cert = await stack.issue(template_vm.uuid)
    image = Identity(template_dir)
    image.install(cert.key_pem, cert.cert_pem, stack.ca_pem.encode())
    image.confirm()
    config_uuid = str(uuidlib.uuid4())
    iso_config = stack.workdir / "template-iso-config.json"
    iso_config.write_text(
        json.dumps(same_config(stack, template_vm.uuid, config_uuid, template_dir).to_json())
    )
    dirs = {}
    for vm in (template_vm, clone_vm):
        dirs[vm.uuid] = stack.lab.state_root / f"disk-of-{vm.uuid}"
        shutil.copytree(template_dir, dirs[vm.uuid])
    generation = clone_vm.generation

    # Both boot at once with the same config.
    started = {}
    for vm in (template_vm, clone_vm):
        cfg = same_config(stack, template_vm.uuid, config_uuid, dirs[vm.uuid])
        started[vm.uuid] = await stack.lab.start_agent(vm, cfg)
    template, clone = stack.agent(template_vm.uuid), stack.agent(clone_vm.uuid)
    clone_task = started[clone_vm.uuid].task
    assert clone_task is not None

    await wait_until(
        lambda: clone.config.vm_uuid == clone_vm.uuid and clone.enrollments == 1,
        20,
        "the clone to adopt its stamped identity and enroll for it",
        detail=stack.agents_detail,
    )
    await stack.wait_paths([template_vm.uuid, clone_vm.uuid], "serial")

    # The clone's own certificate: CN and the one URI SAN name the clone's uuid.
    info = clone.identity.info()
    assert info is not None and info.vm == clone_vm.uuid
    assert info.serial != cert.serial
    x509_cert = x509.load_pem_x509_certificate(clone.identity.cert_path.read_bytes())
    assert pki.vm_from_certificate(x509_cert, TRUST_DOMAIN) == clone_vm.uuid
    assert pki.uri_sans(x509_cert) == [pki.spiffe_id(TRUST_DOMAIN, clone_vm.uuid)]
    record = await stack.record(info.serial)
    assert record["vm"] == clone_vm.uuid and record["state"] == "valid"

    # Its new config, derived from the template's, is what it runs with after a restart.
    clone_dir = dirs[clone_vm.uuid]
    saved = json.loads((clone_dir / STATE_CONFIG_NAME).read_text())
    assert saved["vm_uuid"] == clone_vm.uuid
    assert saved["source_config_uuid"] == config_uuid
    assert saved["config_uuid"] == clone.config.config_uuid != config_uuid
    assert saved["state_dir"] == str(clone_dir)
    assert load_config(iso_config, clone_dir).vm_uuid == clone_vm.uuid
    assert load_config(iso_config, dirs[template_vm.uuid]).vm_uuid == template_vm.uuid
    assert not (dirs[template_vm.uuid] / STATE_CONFIG_NAME).exists()

    # The registry holds both VMs, each on its own serial link.
    await stack.wait_registered([template_vm.uuid, clone_vm.uuid], "serial", host=BRIDGE_HOST)

    async def configs_registered() -> bool:
        records = await stack.records()
        return (
            records[clone_vm.uuid].config_uuid == clone.config.config_uuid
            and records[template_vm.uuid].config_uuid == config_uuid
        )

    # The clone's heartbeats carry its new config uuid.
    await wait_until(configs_registered, 10, "each VM's config uuid registered")

    # Host commands reach each one as itself.
    for uuid in (template_vm.uuid, clone_vm.uuid):
        reply = await host_command(stack.bus, uuid, "info")
        assert reply.ok and reply.result is not None and reply.result["vm"] == uuid

    # No ISO swap, no restart: the same agent task on the same VM run; the template kept its
    # identity and its certificate (it had nothing to enroll).
    assert not clone_task.done() and stack.lab.agents[clone_vm.uuid].agent is clone
    assert clone_vm.generation == generation
    assert template.config.vm_uuid == template_vm.uuid and template.enrollments == 0
    kept = template.identity.info()
    assert kept is not None and kept.serial == cert.serial
    assert (await stack.record(cert.serial))["state"] == "valid"


async def test_host_renew_command_renews_now(stack: TlsStack) -> None:
    vm = await enrolled_vm(stack)
    agent = stack.agent(vm)
    old = agent.identity.info()
    assert old is not None
    reply = await host_command(stack.bus, vm, "renew", deadline_ms=20000, timeout=25)
    assert reply.ok, reply
    assert reply.result is not None
    assert reply.result["link"] == "serial"
    serial = reply.result["serial"]
    assert serial != old.serial
    new = agent.identity.info()
    assert new is not None and new.serial == serial and new.not_after > utcnow()
    assert agent.renewals == 1
    record = await stack.record(serial)
    assert record["renewal_of"] == old.serial and record["vm"] == vm
    # The previous certificate stays valid (it is not revoked by a renewal).
    assert (await stack.record(old.serial))["state"] == "valid"


async def test_guestbus_cert_renew_cli(stack: TlsStack) -> None:
    """The operator's command, as a process: ``guestbus cert renew <vm>``."""
    vm = await enrolled_vm(stack)
    agent = stack.agent(vm)
    await stack.wait_registered([vm], "serial", host=BRIDGE_HOST)
    old = agent.identity.info()
    assert old is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "guestbus.cli.main",
        "cert",
        "renew",
        vm[:13],
        "--nats",
        stack.broker.url,
        "--timeout",
        "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, err.decode()
    new = agent.identity.info()
    assert new is not None and new.serial != old.serial
    text = out.decode()
    assert f"certificate {new.serial}" in text and "over serial" in text, text
