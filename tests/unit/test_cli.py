"""The operator CLI: help, offline commands, and clear errors (no tracebacks)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import NatsServer

ROOT = Path(__file__).resolve().parents[2]
VM = "5b0c1e2a-1111-4222-8333-944455556666"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "guestbus.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        cwd=ROOT,
    )


def test_help_lists_every_command() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for command in ("up", "vms", "ping", "info", "bus", "vm", "schemas"):
        assert command in out.stdout


def test_serial_port_xml_is_the_reference_port() -> None:
    out = cli("vm", "serial-port-xml", VM, "--index", "1")
    assert out.returncode == 0, out.stderr
    serial = ET.fromstring(out.stdout)
    assert serial.tag == "serial" and serial.get("type") == "unix"
    source, target = serial.find("source"), serial.find("target")
    assert source is not None and target is not None
    assert source.get("mode") == "bind"
    assert source.get("path") == f"/var/lib/libvirt/qemu/{VM}.serial.1"
    assert target.get("type") == "isa-serial" and target.get("port") == "1"


def test_serial_port_xml_refuses_bad_input() -> None:
    bad_index = cli("vm", "serial-port-xml", VM, "--index", "4")
    assert bad_index.returncode == 2 and "COM1-COM4" in bad_index.stdout + bad_index.stderr
    bad_vm = cli("vm", "serial-port-xml", "web-1")
    assert bad_vm.returncode == 2 and "not a VM uuid" in bad_vm.stdout + bad_vm.stderr


def test_unreachable_nats_is_one_clear_line() -> None:
    out = cli("vms", env={"GUESTBUS_NATS_URL": "nats://127.0.0.1:1"})
    assert out.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr


def test_schemas_are_in_sync_with_the_contract() -> None:
    out = cli("schemas", "--check")
    assert out.returncode == 0, out.stderr


def test_snapshot_without_a_host_adapter_is_one_clear_line(nats_server: NatsServer) -> None:
    vm = "5b0c1d2e-0000-4000-8000-000000000001"
    out = cli("snapshot", "ls", vm, env={"GUESTBUS_NATS_URL": nats_server.url})
    assert out.returncode == 1, out
    assert f"no host adapter answers for VM {vm}" in out.stderr
    assert "GUESTBUS_LIBVIRT_URI" in out.stderr and "Traceback" not in out.stderr
    bad = cli(
        "snapshot", "create", vm, "--name", "no spaces", env={"GUESTBUS_NATS_URL": nats_server.url}
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "name" in bad.stderr
    bad = cli("snapshot", "attach", vm, "s1", "--disk", "../vdb")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "not a disk name" in bad.stderr
