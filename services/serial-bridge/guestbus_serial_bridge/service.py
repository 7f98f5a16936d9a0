"""serial-bridge: discovers this host's VM serial sockets and holds one link per VM.

Guest RPCs go to ``gb.rpc.<method>`` stamped with the VM of the socket they came from;
``gb.guest.<vm>.<method>`` is served here for exactly the VMs whose socket this host has,
so a command for a VM without an active link is answered at once, never left to hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from guestbus.contract import (
    HEADER_DEADLINE_MS,
    HEADER_REQUEST_ID,
    LinkState,
    guest_wildcard,
)
from guestbus.runtime import BusError, BusService, ServiceContext
from guestbus.wire import errors, valid_id

from . import __version__
from .discovery import VmSocket, scan
from .link import VmLink, link_event
from .settings import BridgeSettings

KNOWN_METHODS = {"ping", "info", "allowed", "hello", "heartbeat", "report"}
MAX_COMMAND_TIMEOUT = 600.0


class SerialBridge(BusService):
    name = "serial-bridge"
    version = __version__
    description = "Links this hypervisor host's VM serial sockets to the bus (one per host)."
    settings_cls = BridgeSettings

    async def setup(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings_as(BridgeSettings)
        self.nc = ctx.nc
        self.links: dict[str, VmLink] = {}
        self.subs: dict[str, Subscription] = {}
        self.commands: set[asyncio.Task[None]] = set()
        self._closed_stats: dict[str, int] = {"frames_in": 0, "frames_out": 0}
        self.drops = Counter(
            "guestbus_bridge_bad_frames_total",
            "Frames from guests dropped or refused, by reason.",
            ["reason"],
            registry=ctx.registry,
        )
        self.rpc_seconds = Histogram(
            "guestbus_bridge_rpc_seconds",
            "Guest RPC round trip through the bus (bridge → router → bridge).",
            ["method", "outcome"],
            registry=ctx.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.command_seconds = Histogram(
            "guestbus_bridge_command_seconds",
            "Host → guest command round trip over the serial link.",
            ["method", "outcome"],
            registry=ctx.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.link_changes = Counter(
            "guestbus_bridge_link_changes_total",
            "Links that went up or down on this bridge.",
            ["state"],
            registry=ctx.registry,
        )
        ctx.registry.register(_LinkCollector(self))
        await self.rescan()
        ctx.spawn(self._scan_forever(), name="discovery")
        ctx.log.info(
            "watching VM serial sockets",
            extra={
                "pattern": self.settings.socket_pattern,
                "xml_dirs": self.settings.libvirt_xml_dirs,
                "port_index": self.settings.serial_port_index,
                "vms": len(self.links),
            },
        )

    async def teardown(self, ctx: ServiceContext) -> None:
        for sub in list(self.subs.values()):
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        if self.commands:
            await asyncio.wait(set(self.commands), timeout=self.settings.command_timeout)
        for link in list(self.links.values()):
            await link.stop("serial-bridge stopping")

    # --- discovery -------------------------------------------------------------------------

    async def _scan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scan_interval)
            try:
                await self.rescan()
            except Exception:
                self.ctx.log.exception("discovery scan failed")

    async def rescan(self) -> None:
        found = await asyncio.get_running_loop().run_in_executor(
            None,
            scan,
            self.settings.socket_pattern or None,
            self.settings.libvirt_xml_dirs,
            self.settings.serial_port_index,
        )
        for uuid in [u for u in self.links if u not in found]:
            await self._drop(uuid)
        for uuid, vm in found.items():
            link = self.links.get(uuid)
            if link is not None and link.vm.path == vm.path:
                if vm.name and link.vm.name != vm.name:
                    link.vm = vm
                continue
            if link is not None:
                await self._drop(uuid)
            await self._add(vm)

    async def _add(self, vm: VmSocket) -> None:
        link = VmLink(vm, self)
        self.links[vm.uuid] = link
        link.task = self.ctx.spawn(link.run(), name=f"link:{vm.uuid}")
        self.subs[vm.uuid] = await self.nc.subscribe(guest_wildcard(vm.uuid), cb=self._command_cb)
        self.ctx.log.info(
            "VM discovered", extra={"vm": vm.uuid, "path": vm.path, "vm_name": vm.name}
        )

    async def _drop(self, uuid: str) -> None:
        link = self.links.pop(uuid, None)
        sub = self.subs.pop(uuid, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if link is not None:
            self._closed_stats["frames_in"] += link.session.stats.frames_in
            self._closed_stats["frames_out"] += link.session.stats.frames_out
            await link.stop("serial socket vanished")
            self.ctx.log.info("VM gone", extra={"vm": uuid, "path": link.vm.path})

    # --- host → guest ----------------------------------------------------------------------

    async def _command_cb(self, msg: Msg) -> None:
        task = asyncio.ensure_future(self._command(msg))
        self.commands.add(task)
        task.add_done_callback(self.commands.discard)

    async def _command(self, msg: Msg) -> None:
        if not msg.reply:
            return
        parts = msg.subject.split(".")
        vm, method = parts[2], parts[3]
        headers = msg.headers or {}
        started = asyncio.get_running_loop().time()
        outcome = "ok"
        try:
            link = self.links.get(vm)
            if link is None:
                raise BusError(errors.NO_ACTIVE_LINK, f"VM {vm} is not on this host", 503)
            try:
                params = json.loads(msg.data) if msg.data else {}
            except ValueError:
                raise BusError(errors.BAD_REQUEST, "command parameters must be JSON") from None
            if not isinstance(params, dict):
                raise BusError(errors.BAD_REQUEST, "command parameters must be a JSON object")
            timeout = self.settings.command_timeout
            if HEADER_DEADLINE_MS in headers:
                try:
                    timeout = min(
                        MAX_COMMAND_TIMEOUT, max(0.01, int(headers[HEADER_DEADLINE_MS]) / 1000)
                    )
                except ValueError:
                    raise BusError(
                        errors.BAD_REQUEST, f"{HEADER_DEADLINE_MS} must be an integer"
                    ) from None
            request_id = headers.get(HEADER_REQUEST_ID)
            if request_id is not None and not valid_id(request_id):
                raise BusError(
                    errors.BAD_REQUEST, f"{HEADER_REQUEST_ID} must be 1-64 chars of [A-Za-z0-9._:-]"
                )
            result = await link.command(method, params, timeout, request_id)
            await self.nc.publish(msg.reply, json.dumps(result).encode())
        except BusError as err:
            outcome = err.code
            await self.nc.publish(msg.reply, err.to_bytes(), headers=err.headers())
        except Exception as exc:
            outcome = errors.INTERNAL
            self.ctx.log.exception("command %s for VM %s failed", method, vm)
            failure = BusError(errors.INTERNAL, f"bridge failed: {type(exc).__name__}", 500)
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, failure.to_bytes(), headers=failure.headers())
        finally:
            label = method if method in KNOWN_METHODS else "other"
            self.command_seconds.labels(label, outcome).observe(
                asyncio.get_running_loop().time() - started
            )

    # --- bookkeeping used by links -----------------------------------------------------------

    def count_drop(self, reason: str) -> None:
        self.drops.labels(reason).inc()

    def observe_rpc(self, method: str, outcome: str, seconds: float) -> None:
        label = method if method in KNOWN_METHODS else "other"
        self.rpc_seconds.labels(label, outcome).observe(seconds)

    def links_up_changed(self) -> None:
        pass

    async def publish_link(self, vm: str, state: LinkState, reason: str | None) -> None:
        self.link_changes.labels(state.value).inc()
        subject, data = link_event(vm, state, self.settings.bridge_host, reason)
        try:
            await self.nc.publish(subject, data)
        except Exception as exc:
            self.ctx.log.warning("could not publish link event for %s: %s", vm, exc)
        self.ctx.log.info("link %s", state.value, extra={"vm": vm, "reason": reason})

    def stats(self) -> dict[str, Any]:
        frames_in = self._closed_stats["frames_in"] + sum(
            link.session.stats.frames_in for link in self.links.values()
        )
        frames_out = self._closed_stats["frames_out"] + sum(
            link.session.stats.frames_out for link in self.links.values()
        )
        return {
            "vms": len(self.links),
            "connected": sum(1 for link in self.links.values() if link.connected),
            "up": sum(1 for link in self.links.values() if link.up),
            "frames_in": frames_in,
            "frames_out": frames_out,
        }


class _LinkCollector(Collector):
    """Link gauges and frame counters computed at scrape time from the live sessions."""

    def __init__(self, bridge: SerialBridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.bridge.stats()
        links = GaugeMetricFamily(
            "guestbus_bridge_links", "VM links on this bridge by state.", labels=["state"]
        )
        links.add_metric(["discovered"], stats["vms"])
        links.add_metric(["connected"], stats["connected"])
        links.add_metric(["up"], stats["up"])
        yield links
        frames = CounterMetricFamily(
            "guestbus_bridge_frames", "Wire frames by direction.", labels=["direction"]
        )
        frames.add_metric(["in"], stats["frames_in"])
        frames.add_metric(["out"], stats["frames_out"])
        yield frames
