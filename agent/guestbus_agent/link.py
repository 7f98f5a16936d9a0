"""Keeps one agent link up: open the stream, hello, heartbeat, serve host commands.

The same loop runs over the serial device (``kind="serial"``) and over mutual TLS to the
gateway (``kind="ip"``); :mod:`guestbus_agent.agent` decides which one carries the traffic.

A serial line has no carrier: the agent cannot see the host connect or go away. So the link
counts as active only while the host answers: hello at start and whenever the host says it
lost its state (``hello_required``), heartbeats every interval, and back to hello with
exponential backoff and jitter after ``serial_failure_limit`` unanswered heartbeats.
"""

import asyncio
import logging
import random
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from guestbus.wire import PROTOCOL_VERSION, errors
from guestbus.wire.aio import Channel, LinkClosed, RemoteError

from . import __version__
from .commands import Commands, uptime_seconds
from .config import AgentConfig

Opener = Callable[[], Awaitable[Tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

log = logging.getLogger("guestbus.agent")


class Backoff:
    """Exponential backoff with jitter: a fleet that lost its host must not return at once."""

    def __init__(
        self, initial: float = 0.5, maximum: float = 30.0, rng: Optional[random.Random] = None
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return float(ceiling / 2 + self.rng.uniform(0, ceiling / 2))

    def reset(self) -> None:
        self.attempt = 0


def serial_opener(device: str, baudrate: int = 115200) -> Opener:
    """Opens a serial device (UART or virtio-serial port) in raw mode via pyserial-asyncio."""

    async def open_device() -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import serial_asyncio  # imported late: lab agents on socket pairs do not need it

        reader, writer = await serial_asyncio.open_serial_connection(
            url=device, baudrate=baudrate, rtscts=False, xonxoff=False
        )
        return reader, writer

    return open_device


class LinkStatus:
    def __init__(self) -> None:
        self.active = False
        self.stamped_vm: Optional[str] = None
        self.host: Optional[str] = None
        self.last_ok: Optional[float] = None
        self.heartbeats_ok = 0
        self.heartbeats_failed = 0
        self.hellos = 0
        self.hellos_ok = 0
        self.downs = 0
        self.consecutive_failures = 0
        self.last_error: Optional[str] = None


class Link:
    """One agent link over one byte stream (serial device or TLS connection)."""

    def __init__(
        self,
        config: AgentConfig,
        opener: Opener,
        commands: Optional[Commands] = None,
        rng: Optional[random.Random] = None,
        kind: str = "serial",
        on_change: Optional[Callable[["Link"], None]] = None,
        on_ack: Optional[Callable[["Link", Dict[str, Any]], Awaitable[None]]] = None,
    ) -> None:
        self.config = config
        self.opener = opener
        self.commands = commands or Commands(config.vm_uuid, config.allowed_commands)
        self.rng = rng or random.Random()
        self.kind = kind
        self.on_change = on_change
        self.on_ack = on_ack
        self.status = LinkStatus()
        self.channel: Optional[Channel] = None
        self._rehello = asyncio.Event()
        self._seq = 0

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _failed(self, why: str) -> None:
        self.status.consecutive_failures += 1
        self.status.last_error = why
        self._changed()

    def _succeeded(self) -> None:
        changed = self.status.consecutive_failures != 0
        self.status.consecutive_failures = 0
        if changed:
            self._changed()

    def request_hello(self) -> None:
        """Say hello again at once (e.g. after the identity changed)."""
        self._rehello.set()

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run forever (until cancelled), reopening the device when it goes away."""
        open_backoff = Backoff(0.5, 10.0, self.rng)
        waiting_logged = False
        while True:
            try:
                reader, writer = await self.opener()
            except (OSError, ImportError, asyncio.TimeoutError) as exc:
                if not waiting_logged:
                    log.warning("%s link: cannot open (%s); retrying", self.kind, exc)
                    waiting_logged = True
                self._failed(f"open: {exc}")
                await asyncio.sleep(open_backoff.next())
                continue
            if waiting_logged:
                log.info("%s link: opened", self.kind)
            waiting_logged = False
            hellos_before = self.status.hellos_ok
            channel = Channel(
                reader,
                writer,
                on_request=self.commands.run,
                on_hello_required=self._rehello.set,
            )
            self.channel = channel
            reading = asyncio.ensure_future(channel.run())
            talking = asyncio.ensure_future(self._converse(channel))
            try:
                done, _ = await asyncio.wait(
                    {reading, talking}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task.exception() is not None and not isinstance(
                        task.exception(), LinkClosed
                    ):
                        log.error("link failed: %r", task.exception())
            finally:
                for task in (reading, talking):
                    task.cancel()
                await asyncio.gather(reading, talking, return_exceptions=True)
                await channel.close()
                self.channel = None
                self._set_down("stream closed")
            if self.status.hellos_ok != hellos_before:
                # The host answered on this connection. One that closes before answering (a
                # gateway refusing the certificate) keeps backing off instead of reconnecting
                # at once, over and over.
                open_backoff.reset()
            await asyncio.sleep(open_backoff.next())

    def _set_down(self, why: str) -> None:
        if self.status.active:
            log.warning("%s link down: %s", self.kind, why)
            self.status.downs += 1
            self.status.active = False
            self._changed()

    # --- the conversation ------------------------------------------------------------------

    def hello_params(self) -> Dict[str, Any]:
        import socket

        return {
            "protocol": PROTOCOL_VERSION,
            "agent_version": __version__,
            "capabilities": self.commands.capabilities(),
            "vm": self.config.vm_uuid,
            "config_uuid": self.config.config_uuid,
            "hostname": socket.gethostname(),
        }

    async def _converse(self, channel: Channel) -> None:
        backoff = Backoff(0.5, max(1.0, min(30.0, self.config.heartbeat_interval * 4)), self.rng)
        while True:
            # Phase 1: hello until the host answers.
            self._rehello.clear()
            try:
                ack = await channel.hello(self.hello_params(), self.config.request_timeout)
            except RemoteError as exc:
                self.status.hellos += 1
                if exc.code != errors.TIMEOUT:
                    log.warning("%s hello refused: %s", self.kind, exc)
                self._failed(f"hello: {exc.code}")
                await asyncio.sleep(backoff.next())
                continue
            self.status.hellos += 1
            self.status.hellos_ok += 1
            backoff.reset()
            self._succeeded()
            self._on_ack(ack)
            if self.on_ack is not None:
                await self.on_ack(self, ack)
            await self._report(channel)
            # Phase 2: heartbeat until the host stops answering or asks for a new hello.
            failures = 0
            while not self._rehello.is_set():
                # ±10 % jitter: links that came up together must not beat together forever.
                interval = self.config.heartbeat_interval * self.rng.uniform(0.9, 1.1)
                try:
                    await asyncio.wait_for(self._rehello.wait(), timeout=interval)
                    break
                except asyncio.TimeoutError:
                    pass
                if await self._heartbeat(channel):
                    failures = 0
                    self._succeeded()
                    continue
                failures += 1
                self._failed("heartbeat unanswered")
                if failures >= self.config.serial_failure_limit:
                    self._set_down(f"{failures} heartbeats unanswered")
                    break
            if self._rehello.is_set():
                log.info("host asked for a new hello (it restarted or lost our link)")
            self._set_down("re-hello")

    def _on_ack(self, ack: Dict[str, Any]) -> None:
        stamped = str(ack.get("vm", ""))
        was_active = self.status.active
        self.status.active = True
        self.status.stamped_vm = stamped
        self.status.host = ack.get("host")
        self.status.last_ok = time.monotonic()
        interval = ack.get("heartbeat_interval")
        log.info(
            "%s link up via %s (identity %s%s)",
            self.kind,
            self.status.host,
            stamped,
            ""
            if stamped == self.config.vm_uuid
            else ", differs from config " + self.config.vm_uuid,
        )
        if isinstance(interval, (int, float)) and interval > 0:
            log.debug("host suggests heartbeat interval %.1fs", interval)
        if not was_active:
            self._changed()

    async def _report(self, channel: Channel) -> None:
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, self.commands.guest_info)
            await channel.request("report", info, self.config.request_timeout)
        except RemoteError as exc:
            log.warning("info report not accepted: %s", exc)

    async def _heartbeat(self, channel: Channel) -> bool:
        self._seq += 1
        params = {
            "seq": self._seq,
            # Claim the identity the host stamped: after a clone it differs from the config.
            "vm": self.status.stamped_vm or self.config.vm_uuid,
            "uptime": uptime_seconds(),
            "config_uuid": self.config.config_uuid,
        }
        timeout = min(self.config.request_timeout, max(self.config.heartbeat_interval, 0.05))
        try:
            await channel.request("heartbeat", params, timeout)
        except RemoteError as exc:
            self.status.heartbeats_failed += 1
            if exc.code not in (errors.TIMEOUT, errors.HELLO_REQUIRED):
                log.warning("heartbeat refused: %s", exc)
            return False
        self.status.heartbeats_ok += 1
        self.status.last_ok = time.monotonic()
        return True


SerialLink = Link  # the name the lab and older code use
