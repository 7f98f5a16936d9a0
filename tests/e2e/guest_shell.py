"""A root shell in a real guest, through its console (COM1, a pty): for tests that must act
inside the guest (write a file, install a hook script, read a mounted snapshot).

    with GuestShell(guest) as sh:
        sh.run("echo hello > /root/f")           # exit status checked, output returned
        out = sh.run("cat /root/f")

The e2e image has a root login without password on the serial console and no network, so
this is the only way in besides the agent. Each command is wrapped in markers the shell
prints (``printf`` of split strings, so the echoed input never matches), and the kernel's own
messages are kept off the console once logged in (lines the guest still logs there are taken
out of a command's output).
"""

from __future__ import annotations

import contextlib
import os
import re
import termios
import threading
import time
import tty
import uuid
import xml.etree.ElementTree as ET
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .libvirt_harness import Guest

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
_CONSOLE_NOISE = re.compile(r"^\[\s*\d+\.\d+\] .*\n?", re.M)
"""Kernel-style lines (``[  113.717771] unit[pid]: …``) the console shows whenever the guest
logs there, interleaved with a command's output; never part of what our commands print."""


class ShellError(RuntimeError):
    pass


class GuestShell:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.fd = -1
        self.buffer = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def _pty(self) -> str:
        root = ET.fromstring(self.guest.live_xml())
        for serial in root.iterfind("./devices/serial"):
            target, source = serial.find("target"), serial.find("source")
            if serial.get("type") != "pty" or target is None or target.get("port") != "0":
                continue
            if source is not None and source.get("path"):
                return str(source.get("path"))
        raise ShellError(f"{self.guest.name} has no console pty in its live XML")

    def __enter__(self) -> GuestShell:
        self.fd = os.open(self._pty(), os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd, termios.TCSANOW)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._login()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(OSError):
            self._write("exit\n")
        self._stop.set()
        os.close(self.fd)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.buffer += _ANSI.sub("", data.decode("utf-8", "replace"))

    def _write(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def _wait(self, pattern: re.Pattern[str], start: int, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = pattern.search(self.buffer, start)
            if found:
                return found
            if time.monotonic() > deadline:
                with self._lock:
                    tail = self.buffer[-2000:]
                raise ShellError(
                    f"{self.guest.name}: no {pattern.pattern!r} in {timeout:.0f}s:\n{tail}"
                )
            time.sleep(0.05)

    def _login(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # a getty may be busy: poke it until it asks or a shell answers
            with self._lock:
                mark = len(self.buffer)
            self._write("\n")
            try:
                found = self._wait(re.compile(r"login: ?$|# ?$", re.M), mark, 5.0)
                break
            except ShellError:
                if time.monotonic() > deadline:
                    raise
        if "login" in found.group(0):
            with self._lock:
                mark = len(self.buffer)
            self._write("root\n")
            self._wait(re.compile(r"# ?$", re.M), mark, 30.0)
        # quiet kernel messages, no echo, a plain prompt
        self.run("stty -echo; dmesg -n 1; export TERM=dumb PS1='# '", timeout=20.0)

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``command`` in the guest's root shell; its output (stdout+stderr)."""
        tag = uuid.uuid4().hex[:10]
        begin, end = f"GBB{tag}", f"GBE{tag}"
        with self._lock:
            mark = len(self.buffer)
        wrapped = (
            f"printf '%s\\n' 'GBB''{tag}'; ( {command} ) 2>&1; "
            f"printf '%s %s\\n' 'GBE''{tag}' \"$?\"\n"
        )
        self._write(wrapped)
        found = self._wait(re.compile(rf"{begin}\n(.*?){end} (\d+)\n", re.S), mark, timeout)
        output, status = _CONSOLE_NOISE.sub("", found.group(1)), int(found.group(2))
        if check and status != 0:
            raise ShellError(f"{self.guest.name}: `{command}` exited {status}:\n{output}")
        return output
