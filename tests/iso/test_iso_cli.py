"""``guestbus iso build / ls / get`` as an operator runs them, against the real services."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ._support import IsoEnv, isoinfo


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IsoEnv]:
    environment = await IsoEnv(tmp_path_factory.mktemp("iso-cli")).start()
    try:
        yield environment
    finally:
        await environment.close()


async def cli(env: IsoEnv, *args: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, GUESTBUS_NATS_URL=env.url)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "guestbus.cli.main", "iso", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


async def test_build_by_name_downloads_checked_isos(env: IsoEnv, tmp_path: Path) -> None:
    vms = await env.add_vms(3, name_prefix="cli")
    out = tmp_path / "out"
    done = await cli(env, "build", "cli-0", vms[1], vms[2][:13], "--config-only", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "built 3 of 3" in done.stderr
    for vm in vms:
        iso = out / f"{vm}.iso"
        assert "Volume id: GUESTBUS" in isoinfo(iso, "-d")
        assert iso.stat().st_mode & 0o777 == 0o600
        assert vm in done.stdout

    listed = await cli(env, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    manifests = {m["vm"]: m for m in json.loads(listed.stdout)}
    for vm in vms:
        digest = hashlib.sha256((out / f"{vm}.iso").read_bytes()).hexdigest()
        assert manifests[vm]["sha256"] == digest
    table = await cli(env, "ls")
    assert "cli-0" in table.stdout and "config-only" in table.stdout

    target = tmp_path / "got.iso"
    got = await cli(env, "get", "cli-1", "-o", str(target))
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == (out / f"{vms[1]}.iso").read_bytes()


async def test_a_failed_vm_is_named_and_the_exit_status_says_so(env: IsoEnv) -> None:
    (vm,) = await env.add_vms(1, name_prefix="ok")
    unknown = str(uuid.uuid4())
    done = await cli(env, "build", vm, unknown, "--config-only")
    assert done.returncode == 1
    assert f"{unknown}  FAILED  unknown_vm" in done.stdout
    assert "failed: " + unknown in done.stderr
    assert "built 1 of 2" in done.stderr and "1 failed" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, status, fragment",
    [
        (["build"], 2, "name the VMs"),
        (["build", "--all", "x"], 2, "not both"),
        (["build", "no-such-vm"], 1, "no VM 'no-such-vm'"),
        (["get", str(uuid.UUID(int=7)), "-o", "x.iso"], 1, "no ISO has been built"),
    ],
    ids=["no-vms", "all-and-vms", "unknown-name", "get-unbuilt"],
)
async def test_usage_errors_are_one_clear_line(
    env: IsoEnv, args: list[str], status: int, fragment: str
) -> None:
    done = await cli(env, *args)
    assert done.returncode == status
    assert fragment in done.stderr and "Traceback" not in done.stderr


async def test_without_the_service_the_cli_says_how_to_start_it(tmp_path: Path) -> None:
    from guestbus.broker import EmbeddedBroker

    broker = EmbeddedBroker(tmp_path / "b", port=0, monitor_port=None)
    await broker.start()
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "guestbus.cli.main", "iso", "ls"],
            capture_output=True,
            text=True,
            env=dict(os.environ, GUESTBUS_NATS_URL=broker.url),
            timeout=60,
        )
    finally:
        await broker.stop()
    assert done.returncode == 1
    assert "iso-builder service is not running" in done.stderr
