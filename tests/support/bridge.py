"""``python -m guestbus_serial_bridge.main`` in a process of its own, configured only by
environment variables: what an operator runs, and what a test can kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .probes import Samples, free_port, http_status, scrape
from .waiting import wait_until


class BridgeProcess:
    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        """``env``: the bridge's ``GUESTBUS_*`` settings but its probe server's, which each
        start picks anew."""
        self.env = dict(env)
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serial-bridge-{self.starts}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self) -> None:
        assert not self.alive, "serial-bridge already running"
        self.starts += 1
        self.http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
        env.update(self.env)
        env.update(
            GUESTBUS_HTTP_HOST="127.0.0.1",
            GUESTBUS_HTTP_PORT=str(self.http_port),
            PYTHONUNBUFFERED="1",
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestbus_serial_bridge.main"],
                env=env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async def ready() -> bool:
            assert self.alive, f"serial-bridge exited:\n{self.log_tail()}"
            try:
                return await http_status(self.http_port, "/readyz") == 200
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                return False

        await wait_until(ready, timeout, "serial-bridge /readyz", 0.1, self.log_tail)

    def kill9(self) -> None:
        """SIGKILL: no teardown, no link-down events, no goodbye to anyone."""
        assert self.proc is not None and self.alive
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self) -> None:
        """SIGTERM (an orderly stop: the bridge drains and reports its links down), then
        SIGKILL after 15 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: proc.poll() is not None, 15, "serial-bridge to exit")
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    async def metrics(self) -> Samples:
        return await scrape(self.http_port)
