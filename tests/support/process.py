"""A guestbus service in a process of its own, started the way ``guestbus up`` starts one
(``python -m guestbus.runtime.launch <module>:main``) and configured only by ``GUESTBUS_*``
environment variables, as an operator runs it. Its output goes to
``<logdir>/<name>-<n>.log`` (``n``: the how-many-th start), it dies with the test run
(parent-death signal), and a test can stop it (SIGTERM: it drains) or kill it (SIGKILL).

:class:`ServiceProcess` waits and stops by blocking (the synchronous e2e tier);
:class:`AsyncServiceProcess` by awaiting, so that a test's event loop keeps serving the
in-process services meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from guestbus.runtime.procs import child_preexec

from .probes import Samples, free_port, http_status, scrape
from .waiting import wait_until


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class _Process:
    def __init__(self, name: str, module: str, env: Mapping[str, str], logdir: Path) -> None:
        """``env``: the service's ``GUESTBUS_*`` settings but its probe server's, which each
        start picks anew (:attr:`http_port`)."""
        self.name = name
        self.module = module
        self.env = dict(env)
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.name}-{self.starts}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"{self.name}: no log"
        tail = "\n".join("    | " + line for line in text[-lines:])
        return f"{self.name} log ({self.log_path}), last {lines} lines:\n{tail}"

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        self.http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
        env.update(self.env)
        env.update(
            GUESTBUS_HTTP_HOST="127.0.0.1",
            GUESTBUS_HTTP_PORT=str(self.http_port),
            PYTHONUNBUFFERED="1",
        )
        self.logdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestbus.runtime.launch", f"{self.module}:main"],
                env=env,
                cwd=self.logdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=child_preexec(),  # it dies with the test run, whatever happens
            )

    # --- ready ---------------------------------------------------------------------------

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    # --- stop ----------------------------------------------------------------------------

    def kill(self) -> int | None:
        """SIGKILL: no teardown, no link-down events, no goodbye to anyone; the status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        return proc.returncode

    async def metrics(self) -> Samples:
        return await scrape(self.http_port)


class ServiceProcess(_Process):
    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until ``/readyz`` says 200 (for synchronous tests); the seconds it took."""
        started = time.monotonic()
        while not self.ready():
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{self.name} not ready within {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (an orderly stop: the service drains), then SIGKILL after ``timeout``;
        the exit status."""
        return None if self.proc is None else terminate(self.proc, timeout)


class AsyncServiceProcess(_Process):
    async def wait_ready(self, timeout: float = 20.0) -> float:
        async def ready() -> bool:
            assert self.alive, f"{self.name} exited:\n{self.log_tail()}"
            try:
                return await http_status(self.http_port, "/readyz") == 200
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                return False

        return await wait_until(ready, timeout, f"{self.name} /readyz", 0.1, self.log_tail)

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (an orderly stop: the service drains), then SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: proc.poll() is not None, timeout, f"{self.name} to exit")
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
