"""DR under test: the real link stack (nats-server, rpc-router, serial-bridge, lab VMs with
real agents) plus dr-orchestrator, in-process or as its own process.

In-process lab agents change a simulated network (``guestbus_agent.netconf.Simulated``):
the host's network is never touched. The namespace tests (test_dr_netns.py) run agent
processes inside network namespaces instead, where iproute2 changes are real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from guestbus.contract import (
    KV_DR_KEYS,
    DrRunGetReply,
    DrRunState,
    DrVmStatus,
    dr_subject,
)
from guestbus.drkeys import ensure_public_key
from guestbus.lab.fleet import LabFleet
from guestbus.runtime import BusError, ServiceHost, check_reply
from guestbus_dr_orchestrator.service import DrOrchestrator
from guestbus_dr_orchestrator.settings import DrSettings

from ..link._support import LinkStack
from ..support.probes import free_port, http_status
from ..support.waiting import wait_until

UNIT = "guestbus-dr-tests"


class DrStack:
    """A link stack whose lab agents verify DR changes with the cluster's DR key."""

    def __init__(
        self,
        workdir: Path,
        *,
        agents: str = "tasks",
        mode: str = "socketpair",
        subnet: str = "10.0.0.0/16",
    ) -> None:
        self.workdir = workdir
        self.link = LinkStack(workdir, bridge_mode="inprocess", heartbeat=0.5)
        self.agents_mode = agents
        self.mode = mode
        self.subnet = subnet
        self.hosts: list[ServiceHost] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.key_path = workdir / "dr-verify.pem"

    async def start(self) -> DrStack:
        await self.link.start()
        keys = await self.link.bus.jetstream().key_value(KV_DR_KEYS)
        self.key_path.write_bytes(await ensure_public_key(keys))
        await self.link.fleet.close()
        self.link.fleet = LabFleet(
            self.link.sockets,
            mode=self.mode,  # type: ignore[arg-type]
            agents=self.agents_mode,  # type: ignore[arg-type]
            heartbeat=0.5,
            certificates=False,
            dr_key=self.key_path,
            dr_subnet=self.subnet,
        )
        return self

    @property
    def url(self) -> str:
        return self.link.broker.url

    @property
    def fleet(self) -> LabFleet:
        return self.link.fleet

    def settings(self, instance: str, **extra: Any) -> DrSettings:
        return DrSettings(
            nats_url=self.url,
            http_port=0,
            dr_instance=instance,
            dr_scan_interval=0.3,
            dr_link_poll=0.3,
            shutdown_timeout=5.0,
            **extra,
        )

    async def orchestrator(self, instance: str = "dr-a", **extra: Any) -> ServiceHost:
        host = ServiceHost(DrOrchestrator(), self.settings(instance, **extra))
        await host.start()
        self.hosts.append(host)
        return host

    def orchestrator_process(self, instance: str, log: Path) -> subprocess.Popen[bytes]:
        """dr-orchestrator as an operator runs it: its own process, configured by env."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
        port = free_port()
        env.update(
            GUESTBUS_NATS_URL=self.url,
            GUESTBUS_HTTP_HOST="127.0.0.1",
            GUESTBUS_HTTP_PORT=str(port),
            GUESTBUS_DR_INSTANCE=instance,
            GUESTBUS_DR_SCAN_INTERVAL="0.3",
            GUESTBUS_DR_LINK_POLL="0.3",
            GUESTBUS_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "guestbus_dr_orchestrator.main"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.http_port = port  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    async def wait_process_ready(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        async def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                port = proc.http_port  # type: ignore[attr-defined]
                return await http_status(port, "/readyz") == 200
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                return False

        await wait_until(ready, 20, "dr-orchestrator /readyz", 0.1)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        for host in reversed(self.hosts):
            await host.stop()
        await self.link.close()

    # --- the bus API -----------------------------------------------------------------------

    async def call(self, endpoint: str, request: BaseModel | dict[str, Any]) -> dict[str, Any]:
        """One ``gb.dr.*`` request; typed errors raise :class:`BusError`."""
        data = (
            request.model_dump_json(exclude_none=True).encode()
            if isinstance(request, BaseModel)
            else json.dumps(request).encode()
        )
        msg = await self.link.bus.request(dr_subject(endpoint), data, timeout=20)
        result = json.loads(check_reply(msg.headers, msg.data) or b"{}")
        assert isinstance(result, dict)
        return result

    async def status(self, run: str) -> DrRunGetReply:
        return DrRunGetReply.model_validate(await self.call("run.get", {"run": run}))

    async def wait_run(self, run: str, timeout: float = 30.0) -> DrRunGetReply:
        latest: list[DrRunGetReply] = []

        async def done() -> bool:
            latest[:] = [await self.status(run)]
            return latest[0].run.state is not DrRunState.RUNNING

        await wait_until(
            done, timeout, f"run {run} to finish", 0.2,
            lambda: "\n".join(
                f"{v.name or v.vm}: {v.state.value} {v.reason or ''}" for v in latest[0].vms
            ) if latest else "",
        )  # fmt: skip
        return latest[0]

    async def wait_vm(
        self, run: str, vm: str, states: set[str], timeout: float = 20.0
    ) -> DrVmStatus:
        found: list[DrVmStatus] = []

        async def reached() -> bool:
            reply = await self.status(run)
            found[:] = [v for v in reply.vms if v.vm == vm]
            return bool(found) and found[0].state.value in states

        await wait_until(reached, timeout, f"VM {vm} in {states}", 0.1)
        return found[0]


def by_vm(reply: DrRunGetReply) -> dict[str, DrVmStatus]:
    return {v.vm: v for v in reply.vms}


def expect_error(code: str) -> Any:
    """``with expect_error("invalid_plan") as err:`` then ``err.value``."""
    import pytest

    return pytest.raises(BusError, match=f"^{code}:")
