"""serial-bridge: discovers this host's VM serial sockets and holds one link per VM.

Guest RPCs go to ``gb.rpc.<method>`` stamped with the VM of the socket they came from;
``gb.guest.<vm>.<method>`` is served here while the VM's link is up. A command for a VM
without an active link has no responder anywhere, so its caller learns it at once (NATS
"no responders", reported as ``no_active_link``), never left to hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from typing import Any

from nats.js.errors import BucketNotFoundError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from guestbus.contract import KV_VMS, VmRecord
from guestbus.provision import provision
from guestbus.registry import Registry
from guestbus.runtime import BusService, ServiceContext
from guestbus.terminator import LinkLimits, LinkMetrics

from . import __version__
from .adapter import HostAdapter
from .discovery import VmSocket, scan_all
from .link import VmLink
from .settings import BridgeSettings


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
        self._closed_stats: dict[str, int] = {"frames_in": 0, "frames_out": 0}
        self.metrics = LinkMetrics(ctx.registry, "guestbus_bridge")
        self.limits = LinkLimits(
            rpc_timeout=self.settings.rpc_timeout,
            command_timeout=self.settings.command_timeout,
            rate_limit=self.settings.rate_limit,
            rate_burst=self.settings.rate_burst,
            write_limit=self.settings.write_limit,
            max_frame=self.settings.max_frame,
        )
        ctx.registry.register(_LinkCollector(self))
        self.vms = await self._open_registry(ctx)
        self._to_register: asyncio.Queue[tuple[VmSocket, tuple[str, ...]]] = asyncio.Queue()
        self._recorded: dict[str, tuple[str | None, tuple[str, ...]]] = {}
        """uuid → name and host capabilities of the VMs queued for the registry by this
        process."""
        self.adapter = HostAdapter(ctx, self.settings)
        await self.adapter.start()
        ctx.spawn(self._register_forever(), name="register")
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
        await self.adapter.close()
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
        found, described = await asyncio.get_running_loop().run_in_executor(
            None,
            scan_all,
            self.settings.socket_pattern or None,
            self.settings.libvirt_xml_dirs,
            self.settings.serial_port_index,
        )
        # The host adapter serves the VMs found here that libvirt knows (running or not).
        try:
            await self.adapter.sync(set(found) | set(described))
        except Exception:  # the links go on whatever libvirt does
            self.ctx.log.exception("host adapter: syncing the served VMs failed")
        for uuid in [u for u in self.links if u not in found]:
            await self._drop(uuid)
        for uuid, vm in found.items():
            link = self.links.get(uuid)
            if link is not None and link.vm.path == vm.path:
                if vm.name and link.vm.name != vm.name:
                    link.rename(vm)
                    self._record(vm, again=True)
                else:
                    self._record(vm)  # a change of host capabilities
                continue
            if link is not None:
                await self._drop(uuid)
            await self._add(vm)
        # Defined domains that are not running (no socket yet) are recorded too, so a VM can
        # get its ISO before its first start; it is linked once QEMU creates its socket.
        for uuid, vm in described.items():
            if uuid not in found:
                self._record(vm)

    def _record(self, vm: VmSocket, again: bool = False) -> None:
        """Queue a VM for the registry: once per name and host capabilities seen for it, or
        ``again``."""
        seen = (vm.name, tuple(self.adapter.capabilities(vm.uuid)))
        if not again and self._recorded.get(vm.uuid) == seen:
            return
        self._recorded[vm.uuid] = seen
        self._to_register.put_nowait((vm, seen[1]))

    async def _add(self, vm: VmSocket) -> None:
        link = VmLink(vm, self)
        self.links[vm.uuid] = link
        self._record(vm, again=True)
        link.task = self.ctx.spawn(link.run(), name=f"link:{vm.uuid}")
        self.ctx.log.info(
            "VM discovered", extra={"vm": vm.uuid, "path": vm.path, "vm_name": vm.name}
        )

    # --- the registry: discovered VMs are listed before their agent says hello -------------

    async def _open_registry(self, ctx: ServiceContext) -> Registry:
        try:
            kv = await ctx.js.key_value(KV_VMS)
        except BucketNotFoundError:
            await provision(ctx.js, self.settings.js_replicas)
            kv = await ctx.js.key_value(KV_VMS)
        return Registry(kv)

    async def _register_forever(self) -> None:
        """One at a time: a thousand VMs found at start must not flood the KV store."""
        while True:
            vm, capabilities = await self._to_register.get()
            try:
                await self.vms.change(
                    vm.uuid,
                    partial(_discovered, vm, self.settings.bridge_host, list(capabilities)),
                )
            except Exception as exc:  # the registry is a convenience here; links go on
                self.ctx.log.warning(
                    "could not record discovered VM %s: %r", vm.uuid, exc, extra={"vm": vm.uuid}
                )

    async def _drop(self, uuid: str) -> None:
        link = self.links.pop(uuid, None)
        if link is not None:
            self._closed_stats["frames_in"] += link.session.stats.frames_in
            self._closed_stats["frames_out"] += link.session.stats.frames_out
            await link.stop("serial socket vanished")
            self.ctx.log.info("VM gone", extra={"vm": uuid, "path": link.vm.path})

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


def _discovered(
    vm: VmSocket, host: str, capabilities: list[str], record: VmRecord
) -> VmRecord | None:
    """A new VM gets a record (link down until its agent says hello); a known one only a new
    name, and what this host can do for it (host adapter). Nothing the router owns is
    touched."""
    update: dict[str, object] = {}
    if record.host is None and record.last_hello is None:
        update.update(name=vm.name or record.name, host=host)
    elif vm.name and record.name != vm.name:
        update["name"] = vm.name
    if record.host_capabilities != capabilities:
        update["host_capabilities"] = capabilities
    return record.model_copy(update=update) if update else None


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
        per_vm = GaugeMetricFamily(
            "guestbus_bridge_vm_link_up",
            "1 while a running VM's serial link is up, 0 while its socket exists but no agent "
            "answers (one series per VM with a serial socket on this host).",
            labels=["vm", "name", "host"],
        )
        host = self.bridge.settings.bridge_host
        for uuid, link in list(self.bridge.links.items()):
            per_vm.add_metric([uuid, link.vm.name or "", host], 1 if link.up else 0)
        yield per_vm
