"""A VM defined in libvirt but never started gets its ISO: the serial-bridge records what the
persistent domain XML describes (no socket exists before QEMU starts), and iso-builder builds
for it. This is the operator's order: define the domain, build its ISO, attach it, start."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guestbus.contract import LinkKind

from ._support import IsoEnv

HOST = "defined-host"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[IsoEnv]:
    environment = await IsoEnv(tmp_path).start()
    try:
        yield environment
    finally:
        await environment.close()


def persistent_xml(vm: str, name: str, socket_path: Path) -> str:
    """A domain as ``/etc/libvirt/qemu/<name>.xml`` holds it, with the reference COM2."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{vm}</uuid>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='{socket_path}'/>
      <target type='isa-serial' port='1'><model name='isa-serial'/></target>
    </serial>
  </devices>
</domain>
"""


async def test_a_defined_domain_is_recorded_and_gets_an_iso_before_it_starts(
    env: IsoEnv, tmp_path: Path
) -> None:
    xml_dir = tmp_path / "etc-libvirt-qemu"
    xml_dir.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="gbdef-"))  # nothing listens here: never started
    vm, name = str(uuid.uuid4()), "defined-not-started"
    (xml_dir / f"{name}.xml").write_text(persistent_xml(vm, name, sockets / f"{vm}.serial.1"))
    await env.bridge(HOST, xml_dirs=[str(xml_dir)])
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while (record := (await env.registry.get(vm))[0]) is None:
        assert loop.time() < end, "the bridge did not record the defined domain"
        await asyncio.sleep(0.1)
    assert (record.name, record.host, record.link) == (name, HOST, LinkKind.DOWN)
    assert record.last_hello is None

    reply = await env.call("build", {"vms": [vm], "kind": "config-only"})
    assert reply["built"] == 1, reply
    assert (env.out_dir / f"{vm}.iso").is_file()
    assert not (sockets / f"{vm}.serial.1").exists()
    sockets.rmdir()
