"""Helpers for the runtime tests: subprocesses with line-by-line output, tiny HTTP client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without GUESTBUS_* settings, plus ``extra``;
    ``tests/`` is on PYTHONPATH so ``runtime.sample_service`` imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
    paths = [str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A child process whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.all_lines: list[str] = []
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err_lines)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream: object, sink: list[str]) -> None:
        assert hasattr(stream, "readline")
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            sink.append(line)
            self.all_lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + "\n".join(self.err_lines)

    async def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a stdout or stderr line (any so far) matches ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            if exited:
                await asyncio.sleep(0.1)  # let the readers catch up
            for line in list(self.all_lines):
                m = rx.search(line)
                if m:
                    return m
            if exited:
                raise AssertionError(
                    f"process exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in:\n{self.output()}")
            await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"process did not exit in {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        return int(self.proc.returncode)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


async def http_request(port: int, raw: bytes, host: str = "127.0.0.1") -> tuple[int, str, bytes]:
    """Send ``raw`` and read the whole response: (status, head, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    status, _, body = await http_request(port, raw)
    return status, body
