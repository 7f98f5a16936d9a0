"""Host → guest commands the agent serves, each enabled by the config's allow-list.

Anything not allow-listed gets the typed ``not_allowed`` error; nothing here runs a shell.
"""

import asyncio
import json
import os
import platform
import socket
import subprocess
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from guestbus.wire import errors
from guestbus.wire.aio import RemoteError

from . import __version__

Handler = Callable[[Dict[str, Any]], Awaitable[Dict[str, Any]]]


def os_pretty_name(path: str = "/etc/os-release") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def uptime_seconds() -> float:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def interface_entry(link: Dict[str, Any]) -> Dict[str, Any]:
    """One link of ``ip -j addr`` as ``info`` reports it (name, MAC, up, CIDR addresses)."""
    return {
        "name": link.get("ifname", "?"),
        "mac": link.get("address"),
        "up": "UP" in link.get("flags", []),
        "addresses": [
            "{}/{}".format(a["local"], a["prefixlen"])
            for a in link.get("addr_info", [])
            if "local" in a and "prefixlen" in a
        ],
    }


def interfaces() -> List[Dict[str, Any]]:
    """Interfaces with their addresses, from ``ip -j addr`` (iproute2), else /sys names."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, timeout=3, check=True
        ).stdout
        return [interface_entry(link) for link in json.loads(out.decode("utf-8", "replace"))]
    except (OSError, subprocess.SubprocessError, ValueError, TypeError, KeyError):
        pass
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        names = []
    return [{"name": n, "mac": None, "up": None, "addresses": []} for n in names]


def agent_usage() -> Dict[str, Any]:
    """The agent's own footprint (so operators can see what it costs the guest)."""
    usage: Dict[str, Any] = {"agent_cpu_seconds": round(time.process_time(), 3)}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    usage["agent_rss_bytes"] = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return usage


def guest_info(
    vm: str, interfaces_fn: Optional[Callable[[], List[Dict[str, Any]]]] = None
) -> Dict[str, Any]:
    return {
        "vm": vm,
        "hostname": socket.gethostname(),
        "os": os_pretty_name(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "agent_version": __version__,
        "python": platform.python_version(),
        "uptime": uptime_seconds(),
        "interfaces": (interfaces_fn or interfaces)(),
        **agent_usage(),
    }


class Commands:
    """The allow-listed command table of one agent."""

    def __init__(
        self,
        vm: str,
        allowed: Tuple[str, ...],
        extra: Optional[Dict[str, Handler]] = None,
        interfaces_fn: Optional[Callable[[], List[Dict[str, Any]]]] = None,
        features: Tuple[str, ...] = (),
    ) -> None:
        self.vm = vm
        self.allowed = tuple(allowed)
        # Capabilities beyond commands (e.g. "ssr": root in the guest can restore files).
        self.features = tuple(features)
        self.interfaces_fn = interfaces_fn
        self._table: Dict[str, Handler] = {
            "ping": self._ping,
            "info": self._info,
            "allowed": self._allowed,
        }
        self._table.update(extra or {})

    def capabilities(self) -> List[str]:
        commands = ["cmd:" + name for name in self.allowed if name in self._table]
        return commands + list(self.features)

    async def run(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        if method not in self.allowed or method not in self._table:
            raise RemoteError(
                errors.NOT_ALLOWED,
                "command '{}' is not allowed on this VM (allowed: {})".format(
                    method, ", ".join(self.allowed) or "none"
                ),
                {"allowed": list(self.allowed)},
            )
        return await self._table[method](params)

    async def _ping(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return {"pong": True, "agent_time": time.time()}

    def guest_info(self) -> Dict[str, Any]:
        return guest_info(self.vm, self.interfaces_fn)

    async def _info(self, params: Dict[str, Any]) -> Dict[str, Any]:
        # ``ip`` and /proc reads block; keep the link loop responsive meanwhile.
        return await asyncio.get_running_loop().run_in_executor(None, self.guest_info)

    async def _allowed(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return {"commands": list(self.allowed)}
