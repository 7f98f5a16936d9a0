"""One VM's link: QEMU's unix socket ↔ the wire session ↔ the bus.

The identity of everything read here is the VM this socket belongs to (stamped in headers);
nothing the guest writes can change it. Writes never block: a guest that stops reading gets
``unavailable`` answers instead of an ever-growing buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from guestbus.contract import (
    EVT_GUEST,
    EVT_LINK,
    HEADER_HOST,
    HEADER_LINK,
    HEADER_VM,
    HEADER_VM_NAME,
    LinkEvent,
    LinkKind,
    LinkState,
    evt_subject,
    rpc_subject,
)
from guestbus.ratelimit import TokenBucket
from guestbus.runtime import BusError
from guestbus.wire import Session, SessionState, errors
from guestbus.wire.aio import Channel, LinkClosed, RemoteError

from .discovery import VmSocket

if TYPE_CHECKING:
    from .service import SerialBridge

log = logging.getLogger("guestbus.serial-bridge")


class VmLink:
    def __init__(self, vm: VmSocket, bridge: SerialBridge) -> None:
        self.vm = vm
        self.bridge = bridge
        settings = bridge.settings
        # One session per VM for the bridge's lifetime: its memory of answered requests
        # survives QEMU socket reconnects.
        self.session = Session(max_frame=settings.max_frame)
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        self.channel: Channel | None = None
        self.connected = False
        self.up = False
        self.task: asyncio.Task[None] | None = None
        self.connects = 0

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.session.state is SessionState.READY

    # --- socket lifecycle ------------------------------------------------------------------

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
            self.connects += 1
            self.connected = True
            channel = Channel(
                reader,
                writer,
                self.session,
                on_request=self.guest_rpc,
                on_hello=self.guest_hello,
                on_event=self.guest_event,
                on_drop=self.bridge.count_drop,
                write_limit=self.bridge.settings.write_limit,
            )
            self.channel = channel
            log.info("connected to %s (VM %s)", self.vm.path, self.vm.uuid)
            try:
                await channel.run()
            except OSError as exc:
                log.info("socket of VM %s failed: %s", self.vm.uuid, exc)
            finally:
                self.channel = None
                self.connected = False
                await channel.close()
                await self.set_down("serial socket closed (VM stopped or restarted?)")
            await asyncio.sleep(delay)

    async def stop(self, reason: str) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.set_down(reason)

    async def set_down(self, reason: str) -> None:
        if not self.up:
            return
        self.up = False
        self.bridge.links_up_changed()
        await self.bridge.publish_link(self.vm.uuid, LinkState.DOWN, reason)

    # --- guest → host ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {
            HEADER_VM: self.vm.uuid,
            HEADER_LINK: LinkKind.SERIAL.value,
            HEADER_HOST: self.bridge.settings.bridge_host,
        }
        if self.vm.name:
            headers[HEADER_VM_NAME] = self.vm.name
        return headers

    def _admit(self, method: str) -> None:
        if not self.bucket.allow():
            self.bridge.count_drop("rate_limited")
            raise RemoteError(
                errors.RATE_LIMITED,
                f"too many frames from this VM (limit {self.bridge.settings.rate_limit:g}/s)",
            )

    async def _forward(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            subject = rpc_subject(method)
        except ValueError:
            raise RemoteError(errors.UNKNOWN_METHOD, f"no RPC named {method!r}") from None
        started = time.perf_counter()
        outcome = "ok"
        try:
            reply = await self.bridge.nc.request(
                subject,
                json.dumps(params).encode(),
                timeout=self.bridge.settings.rpc_timeout,
                headers=self._headers(),
            )
        except NoRespondersError:
            outcome = "unavailable"
            raise RemoteError(
                errors.UNAVAILABLE, f"no service answers {subject} (is rpc-router running?)"
            ) from None
        except NatsTimeout:
            outcome = "timeout"
            raise RemoteError(errors.TIMEOUT, f"{subject} did not answer in time") from None
        finally:
            self.bridge.observe_rpc(method, outcome, time.perf_counter() - started)
        err = BusError.from_reply(reply.headers, reply.data)
        if err is not None:
            raise RemoteError(err.code, err.message, err.details)
        try:
            result = json.loads(reply.data) if reply.data else {}
        except ValueError:
            raise RemoteError(errors.INTERNAL, f"{subject} answered with invalid JSON") from None
        return result if isinstance(result, dict) else {"result": result}

    async def guest_hello(self, params: dict[str, Any]) -> dict[str, Any]:
        self._admit("hello")
        ack = await self._forward("hello", params)
        if not self.up:
            self.up = True
            self.bridge.links_up_changed()
            await self.bridge.publish_link(self.vm.uuid, LinkState.UP, None)
        return ack

    async def guest_rpc(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._admit(method)
        return await self._forward(method, params)

    async def guest_event(self, method: str, params: dict[str, Any]) -> None:
        if not self.bucket.allow():
            self.bridge.count_drop("rate_limited")
            return
        try:
            await self.bridge.nc.publish(
                evt_subject(EVT_GUEST, self.vm.uuid),
                json.dumps({"method": method, "params": params}).encode(),
                headers=self._headers(),
            )
        except Exception as exc:  # a bus hiccup must not end the link
            log.warning("could not publish event from VM %s: %s", self.vm.uuid, exc)

    # --- host → guest ----------------------------------------------------------------------

    async def command(
        self, method: str, params: dict[str, Any], timeout: float, request_id: str | None
    ) -> dict[str, Any]:
        channel = self.channel
        if channel is None or not self.ready:
            raise BusError(
                errors.NO_ACTIVE_LINK,
                f"VM {self.vm.uuid} has no active serial link on {self.bridge.settings.bridge_host}"
                " (agent not running or not yet connected)",
                status=503,
            )
        try:
            return await channel.request(method, params, timeout, request_id=request_id)
        except LinkClosed:
            raise BusError(
                errors.LINK_LOST, f"the serial link of VM {self.vm.uuid} closed mid-command", 503
            ) from None
        except RemoteError as exc:
            raise BusError(exc.code, exc.message, STATUS.get(exc.code, 502), exc.details) from None


STATUS = {
    errors.BAD_REQUEST: 400,
    errors.NOT_ALLOWED: 403,
    errors.UNKNOWN_METHOD: 404,
    errors.IDENTITY_MISMATCH: 403,
    errors.TOO_LARGE: 413,
    errors.RATE_LIMITED: 429,
    errors.TIMEOUT: 504,
    errors.NO_ACTIVE_LINK: 503,
    errors.HELLO_REQUIRED: 503,
    errors.LINK_LOST: 503,
    errors.UNAVAILABLE: 503,
    errors.INTERNAL: 500,
}


def link_event(vm: str, state: LinkState, host: str, reason: str | None) -> tuple[str, bytes]:
    event = LinkEvent(vm=vm, state=state, link=LinkKind.SERIAL, host=host, reason=reason)
    return evt_subject(EVT_LINK, vm), event.model_dump_json().encode()
