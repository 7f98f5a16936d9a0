"""``guestbus up`` end to end, as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

import nats
import pytest

from guestbus.contract import KV_LEASES, KV_VMS, OBJ_ISOS, STREAM_EVENTS
from guestbus.runtime.procs import pid_alive

from ..support.probes import free_port
from .helpers import Proc, child_env, python

URL_RX = r"embedded NATS at (nats://\S+) \(pid (\d+)"


async def test_up_starts_broker_provisions_and_stops_clean(tmp_path: Path) -> None:
    proc = Proc(
        # the `guestbus` console script is guestbus.cli.main:main
        python(
            *("-m", "guestbus.cli.main", "up", "--state-dir", str(tmp_path)),
            *("--port", "0", "--stop-timeout", "5"),
        ),
        child_env({}),
    )
    try:
        m = await proc.wait_for(URL_RX)
        url, broker_pid = m.group(1), int(m.group(2))
        await proc.wait_for(r"guestbus up: ready")
        # Least privilege by default: no anonymous clients; the operator's credentials are
        # in the state directory (mode 0600) and are what the CLI uses.
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
        creds_path = tmp_path / "operator.json"
        assert creds_path.stat().st_mode & 0o777 == 0o600
        creds = json.loads(creds_path.read_text())
        assert creds["url"] == url and creds["user"] == "operator"
        assert creds["password"] not in (tmp_path / "nats-server.conf").read_text()
        nc = await nats.connect(
            url,
            user=creds["user"],
            password=creds["password"],
            inbox_prefix=creds["inbox_prefix"],
        )
        js = nc.jetstream()
        await js.stream_info(STREAM_EVENTS)
        await js.key_value(KV_VMS)
        await js.key_value(KV_LEASES)
        await js.object_store(OBJ_ISOS)
        await nc.close()
        assert pid_alive(broker_pid)
        proc.signal(signal.SIGINT)
        assert await proc.wait_exit() == 0
    finally:
        proc.kill()
    assert not pid_alive(broker_pid)
    assert (tmp_path / "nats").is_dir()
    assert not creds_path.exists()  # the password dies with the run
    assert "Traceback" not in proc.output()


SUPERVISED = """
import sys
from guestbus import permissions as p
from guestbus.cli import up
up.SERVICES.clear()  # only the services of this test
up.SERVICES.append(up.ServiceEntry("sample", "tests.runtime.sample_service", {port}))
up.SERVICES.append(up.ServiceEntry("ghost", "guestbus_no_such_service.main", 0))
# a site's own service gets its own NATS user: its endpoints and nothing else; the
# operator may call them
p.register(p.Role("sample", "test service", p.sub("{prefix}.*")))
op = p.ROLES[p.OPERATOR]
p.register(p.Role(op.name, op.description, op.grant + p.pub("{prefix}.*"), service=False))
sys.exit(up.main(sys.argv[1:]))
"""


async def test_up_supervises_services(tmp_path: Path) -> None:
    port = free_port()
    prefix = f"u{uuid.uuid4().hex[:8]}"
    proc = Proc(
        python(
            "-c",
            SUPERVISED.format(port=port, prefix=prefix),
            "--state-dir",
            str(tmp_path),
            "--port",
            "0",
            "--stop-timeout",
            "5",
        ),
        child_env({"GUESTBUS_SAMPLE_PREFIX": prefix, "GUESTBUS_EVENT_LOOP": "asyncio"}),
    )
    try:
        url, broker_pid = (await proc.wait_for(URL_RX)).groups()
        await proc.wait_for("skipping service ghost: module guestbus_no_such_service.main")
        row = await proc.wait_for(rf"^\s+sample\s+(\d+)\s+{port}\s+(\S+)")
        child_pid, status = int(row.group(1)), row.group(2)
        assert status == "ready"
        await proc.wait_for(r"ghost\s+-\s+-\s+skipped \(not installed\)")
        await proc.wait_for(r"guestbus up: ready")

        creds = json.loads((tmp_path / "operator.json").read_text())
        nc = await nats.connect(
            url,
            user=creds["user"],
            password=creds["password"],
            inbox_prefix=creds["inbox_prefix"],
        )
        ping = json.loads((await nc.request("$SRV.PING.sample", b"", timeout=2)).data)
        assert ping["name"] == "sample"
        assert (await nc.request(f"{prefix}.echo", b"hi", timeout=2)).data == b"hi"

        # a service that dies is reported and restarted
        os.kill(child_pid, signal.SIGKILL)
        await proc.wait_for(rf"service sample \(pid {child_pid}\) exited unexpectedly")
        restarted = int((await proc.wait_for(r"restarted service sample \(pid (\d+)\)")).group(1))
        reply = None
        for _ in range(100):
            try:
                reply = await nc.request(f"{prefix}.echo", b"again", timeout=0.5)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        assert reply is not None and reply.data == b"again"
        ping = json.loads((await nc.request("$SRV.PING.sample", b"", timeout=2)).data)
        await nc.close()

        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
    finally:
        proc.kill()
    assert not pid_alive(int(broker_pid))
    assert not pid_alive(child_pid)
    assert not pid_alive(restarted)
    # The service's own JSON log (in STATE_DIR/logs) shows its graceful stop.
    log_lines = (tmp_path / "logs" / "sample.log").read_text().splitlines()
    assert any('"msg": "service stopped"' in line for line in log_lines)
