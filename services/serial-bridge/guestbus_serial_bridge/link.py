"""One VM's serial link: connect to QEMU's unix socket, reconnect when QEMU restarts.

Everything past the socket — stamping, forwarding, host commands, limits — is the shared
:class:`guestbus.terminator.Terminator`, the same code the TLS gateway runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from guestbus.contract import LinkKind
from guestbus.terminator import Terminator
from guestbus.wire import Session

from .discovery import VmSocket

if TYPE_CHECKING:
    from .service import SerialBridge

log = logging.getLogger("guestbus.serial-bridge")


class VmLink:
    def __init__(self, vm: VmSocket, bridge: SerialBridge) -> None:
        self.vm = vm
        self.bridge = bridge
        # One terminator per VM for the bridge's lifetime: its session's memory of answered
        # guest requests survives QEMU socket reconnects.
        self.term = Terminator(
            bridge.nc,
            vm.uuid,
            LinkKind.SERIAL,
            bridge.settings.bridge_host,
            metrics=bridge.metrics,
            limits=bridge.limits,
            name=vm.name,
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.term.up

    @property
    def connected(self) -> bool:
        return self.term.connected

    @property
    def session(self) -> Session:
        return self.term.session

    def rename(self, vm: VmSocket) -> None:
        self.vm = vm
        self.term.name = vm.name

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.vm.path, limit=1 << 16)
            except OSError as exc:
                log.debug("connect %s failed: %s", self.vm.path, exc)
                await asyncio.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            log.info("connected to %s (VM %s)", self.vm.path, self.vm.uuid)
            await self.term.serve(reader, writer)
            await asyncio.sleep(delay)

    async def stop(self, reason: str) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.term.close(reason)
