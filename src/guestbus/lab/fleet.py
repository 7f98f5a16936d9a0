"""Lab VMs with real agents: the demo, the tests and the benchmarks run this.

Agents run either as asyncio tasks in this process (``agents="tasks"``; thousands fit, on
socket pairs) or as separate ``guestbus-agent`` processes on the VMs' pty devices
(``agents="processes"``), exactly as the agent runs in a guest.

CLI: ``python -m guestbus.lab.fleet --dir DIR --vms N [--mode pty|socketpair]
[--agents tasks|processes] [--heartbeat S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from guestbus.lab.hypervisor import LabHypervisor, LabMode, LabVM
from guestbus_agent.agent import Agent
from guestbus_agent.config import AgentConfig
from guestbus_agent.dr import DrOptions
from guestbus_agent.link import Link, serial_opener
from guestbus_agent.netconf import Simulated

log = logging.getLogger("guestbus.lab.fleet")

AgentMode = Literal["tasks", "processes"]
DEMO_NAMESPACE = uuidlib.UUID("6f1c2e4a-8d3b-5a7e-9c0f-2b4d6e8a1c3e")


def agent_config(
    vm: LabVM,
    heartbeat: float,
    device: str | None = None,
    state_root: Path | None = None,
    gateway: tuple[str, int] = ("127.0.0.1", 2074),
) -> AgentConfig:
    root = state_root or Path(tempfile.gettempdir()) / "guestbus-lab-state"
    return AgentConfig(
        vm_uuid=vm.uuid,
        config_uuid=str(uuidlib.uuid4()),
        gateway_host=gateway[0],
        gateway_port=gateway[1],
        state_dir=str(root / vm.uuid),
        serial_device=device or vm.device_path or "/dev/null",
        heartbeat_interval=heartbeat,
        request_timeout=max(1.0, min(5.0, heartbeat)),
        source=f"lab:{vm.uuid}",
    )


@dataclass
class LabAgent:
    vm: LabVM
    config: AgentConfig
    link: Link | None = None
    """The agent's serial link (``agent.serial``)."""
    agent: Agent | None = None
    task: asyncio.Task[None] | None = None
    process: asyncio.subprocess.Process | None = None
    config_path: Path | None = None
    restarts: int = field(default=0)

    @property
    def network(self) -> Simulated | None:
        """The simulated network of an in-process agent (DR dry run)."""
        if self.agent is None or not isinstance(self.agent.dr.backend, Simulated):
            return None
        return self.agent.dr.backend


def lab_mac(uuid: str) -> str:
    """A stable, locally administered MAC for a lab VM."""
    h = uuid.replace("-", "")
    return "52:54:00:" + ":".join(h[i : i + 2] for i in (0, 2, 4))


def lab_address(subnet: str, index: int) -> str:
    """The ``index``-th lab VM's address in ``subnet`` (hosts from .10 on)."""
    import ipaddress

    net = ipaddress.ip_network(subnet)
    return f"{net.network_address + 10 + index}/{net.prefixlen}"


class LabFleet:
    """A lab hypervisor plus one agent per VM."""

    def __init__(
        self,
        socket_dir: Path,
        *,
        mode: LabMode = "pty",
        agents: AgentMode = "tasks",
        heartbeat: float = 5.0,
        use_pyserial: bool = True,
        config_overrides: dict[str, object] | None = None,
        gateway: tuple[str, int] = ("127.0.0.1", 2074),
        state_root: Path | None = None,
        certificates: bool = True,
        dr_key: Path | None = None,
        dr_subnet: str | None = None,
        agent_args: Sequence[str] = (),
    ) -> None:
        self.certificates = certificates
        # DR: in-process agents get a simulated network (eth0 with one address in
        # dr_subnet, nothing on the host changes); agent processes get agent_args.
        self.dr_key = dr_key
        self.dr_subnet = dr_subnet
        self.agent_args = tuple(agent_args)
        self._index = 0
        if agents == "processes" and mode != "pty":
            raise ValueError("separate agent processes need pty mode (they open a device)")
        self.hypervisor = LabHypervisor(socket_dir, mode=mode)
        self.mode = mode
        self.agents_mode = agents
        self.heartbeat = heartbeat
        self.use_pyserial = use_pyserial and mode == "pty"
        self.config_overrides = dict(config_overrides or {})
        self.agents: dict[str, LabAgent] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="guestbus-lab-")
        self.gateway = gateway
        # Each agent keeps its certificate and derived config under state_root/<uuid>.
        self.state_root = state_root or Path(self._tmp.name) / "state"
        self.hypervisor.on_vm_removed.append(self._on_removed)

    async def __aenter__(self) -> LabFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _config(self, vm: LabVM) -> AgentConfig:
        cfg = agent_config(vm, self.heartbeat, state_root=self.state_root, gateway=self.gateway)
        if self.config_overrides:
            data = cfg.to_json()
            data.update(self.config_overrides)
            from guestbus_agent.config import parse_config

            cfg = parse_config(data, cfg.source)
        return cfg

    async def add_vm(self, uuid: str | None = None, *, agent: bool = True) -> LabVM:
        vm = await self.hypervisor.add_vm(uuid)
        if agent:
            await self.start_agent(vm)
        return vm

    async def add_vms(self, n: int) -> list[LabVM]:
        return [await self.add_vm() for _ in range(n)]

    def _simulated(self, vm: LabVM) -> Simulated:
        addresses = []
        if self.dr_subnet:
            addresses.append(lab_address(self.dr_subnet, self._index))
        self._index += 1
        return Simulated([{"name": "eth0", "mac": lab_mac(vm.uuid), "addresses": addresses}])

    async def start_agent(
        self,
        vm: LabVM,
        config: AgentConfig | None = None,
        *,
        prefix: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> LabAgent:
        """Start ``vm``'s agent; in process mode ``prefix`` goes before the command (e.g.
        ``ip netns exec NS``) and ``args`` after the fleet's ``agent_args``."""
        cfg = config or self._config(vm)
        agent = LabAgent(vm=vm, config=cfg)
        self.agents[vm.uuid] = agent
        if self.agents_mode == "processes":
            agent.config_path = Path(self._tmp.name) / f"{vm.uuid}.json"
            data = cfg.to_json()
            data.pop("serial_device")
            agent.config_path.write_text(json.dumps(data))
            dr_args = ["--dr-key", str(self.dr_key)] if self.dr_key else []
            agent.process = await asyncio.create_subprocess_exec(
                *prefix,
                sys.executable,
                "-m",
                "guestbus_agent.main",
                "--config",
                str(agent.config_path),
                "--device",
                str(vm.device_path),
                "--log-level",
                "WARNING",
                "--no-iso",
                *dr_args,
                *self.agent_args,
                *args,
            )
            return agent

        if self.use_pyserial:

            async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                # The device of a restarted VM may be another pty: look it up at each open.
                if vm.device_path is None:
                    raise FileNotFoundError("VM has no serial device (stopped)")
                return await serial_opener(vm.device_path)()
        else:

            async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                if not vm.running:
                    raise FileNotFoundError("VM stopped")
                return await vm.open_guest()

        dr = DrOptions(
            key_path=self.dr_key or Path(cfg.state_dir) / "dr-verify.pem",
            root=Path(cfg.state_dir) / "root",
            backend=self._simulated(vm),
        )
        agent.agent = Agent(cfg, opener, certificates=self.certificates, dr=dr)
        agent.link = agent.agent.serial
        agent.task = asyncio.ensure_future(agent.agent.run())
        return agent

    async def stop_agent(self, uuid: str) -> None:
        agent = self.agents.pop(uuid, None)
        if agent is None:
            return
        if agent.task is not None:
            agent.task.cancel()
            await asyncio.gather(agent.task, return_exceptions=True)
        if agent.process is not None and agent.process.returncode is None:
            agent.process.terminate()
            try:
                await asyncio.wait_for(agent.process.wait(), 5)
            except TimeoutError:
                agent.process.kill()
                await agent.process.wait()

    async def _on_removed(self, vm: LabVM) -> None:
        await self.stop_agent(vm.uuid)

    def active_count(self) -> int:
        return sum(1 for a in self.agents.values() if a.link is not None and a.link.status.active)

    async def wait_active(self, n: int | None = None, timeout: float = 30.0) -> None:
        """Wait until ``n`` (default: all) in-process agents report an active link."""
        want = len(self.agents) if n is None else n
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.active_count() < want:
            if loop.time() > end:
                raise TimeoutError(f"only {self.active_count()}/{want} agent links active")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for uuid in list(self.agents):
            await self.stop_agent(uuid)
        await self.hypervisor.close()
        self._tmp.cleanup()


def domain_xml(name: str, vm: LabVM) -> str:
    """A minimal libvirt domain XML with the reference serial port (target port 1)."""
    return (
        f"<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{vm.uuid}</uuid>\n"
        "  <devices>\n    <serial type='unix'>\n"
        f"      <source mode='bind' path='{vm.socket_path}'/>\n"
        "      <target type='isa-serial' port='1'/>\n    </serial>\n  </devices>\n</domain>\n"
    )


def write_domain_xml(directory: Path, name: str, vm: LabVM) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.xml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(domain_xml(name, vm), encoding="utf-8")
    tmp.replace(path)
    return path


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    async with LabFleet(
        Path(args.dir),
        mode=args.mode,
        agents=args.agents,
        heartbeat=args.heartbeat,
        certificates=not args.no_certificates,
        dr_key=Path(args.dr_key) if args.dr_key else None,
        dr_subnet=args.dr_subnet,
    ) as fleet:
        # Stable identities (uuid5 of the index): restarting the demo reuses its VMs.
        vms = []
        for i in range(args.vms):
            vm = await fleet.add_vm(str(uuidlib.uuid5(DEMO_NAMESPACE, f"demo-{i}")))
            if args.xml_dir:
                write_domain_xml(Path(args.xml_dir), f"demo-{i}", vm)
            vms.append(vm)
        print(f"lab: {len(vms)} VMs ({args.mode}, agents as {args.agents}) in {args.dir}")
        if not args.quiet:
            for vm in vms:
                print(f"  {vm.uuid}  {vm.socket_path}  {vm.device_path or '(socket pair)'}")
        sys.stdout.flush()
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m guestbus.lab.fleet",
        description="Lab hypervisor with one guestbus agent per VM (for demos and tests).",
    )
    p.add_argument("--dir", required=True, help="directory for the VM serial sockets")
    p.add_argument("--vms", type=int, default=3, help="number of VMs (default 3)")
    p.add_argument("--mode", choices=["pty", "socketpair"], default="pty")
    p.add_argument("--agents", choices=["tasks", "processes"], default="tasks")
    p.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval (s)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--quiet", action="store_true", help="print a summary, not every VM")
    p.add_argument(
        "--no-certificates",
        action="store_true",
        help="agents do not enroll or renew certificates (no cert-authority: links only)",
    )
    p.add_argument(
        "--dr-key",
        help="the DR verify key (PEM) every agent uses (default: none, DR changes refused)",
    )
    p.add_argument(
        "--dr-subnet",
        help="give VM i the address .10+i of this subnet on a simulated eth0 (DR dry run)",
    )
    p.add_argument(
        "--xml-dir",
        help="also write a libvirt-style domain XML per VM here (name demo-N), as libvirt "
        "keeps in its run directory, so the bridge can discover VMs with their names",
    )
    args = p.parse_args(argv)
    if args.vms < 0:
        p.error("--vms must be >= 0")
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
