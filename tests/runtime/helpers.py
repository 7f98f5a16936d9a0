"""Helpers for the runtime tests: subprocesses with line-by-line output, tiny HTTP client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without GUESTBUS_* settings, plus ``extra``;
    the repository root is on PYTHONPATH so ``tests.runtime.sample_service`` imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
    paths = [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
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
