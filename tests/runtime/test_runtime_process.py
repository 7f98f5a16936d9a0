"""The sample service as a real process: settings errors, logs, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from typing import TYPE_CHECKING

from nats.aio.client import Client

from .helpers import Proc, child_env, python

if TYPE_CHECKING:
    from tests.conftest import NatsServer

SAMPLE = ("-m", "tests.runtime.sample_service")


async def test_bad_settings_exit_2_naming_the_variables() -> None:
    proc = Proc(
        python(*SAMPLE),
        child_env(
            {
                "GUESTBUS_HTTP_PORT": "abc",
                "GUESTBUS_LOG_LEVEL": "verbose",
                "GUESTBUS_NATS_PASSWORD": "",
                "GUESTBUS_SAMPLE_DELAY": "-1",
            }
        ),
    )
    assert await proc.wait_exit() == 2
    err = "\n".join(proc.err_lines)
    assert "GUESTBUS_HTTP_PORT: Input should be a valid integer" in err
    assert "(got 'abc')" in err
    assert "GUESTBUS_LOG_LEVEL:" in err and "(got 'verbose')" in err
    assert "GUESTBUS_SAMPLE_DELAY:" in err
    assert "Traceback" not in err
    assert proc.lines == []


async def test_sigterm_answers_every_received_request(nats_server: NatsServer, nc: Client) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    proc = Proc(
        python(*SAMPLE),
        child_env(
            {
                "GUESTBUS_NATS_URL": nats_server.url,
                "GUESTBUS_HTTP_PORT": "0",
                "GUESTBUS_SAMPLE_PREFIX": prefix,
                "GUESTBUS_SAMPLE_DELAY": "0.3",
                "GUESTBUS_SAMPLE_CONCURRENCY": "4",
            }
        ),
    )
    try:
        await proc.wait_for(r'"msg": "service started"')
        requests = [
            asyncio.create_task(nc.request(f"{prefix}.slow", str(i).encode(), timeout=10))
            for i in range(10)
        ]
        await asyncio.sleep(0)  # let every request task publish
        await nc.flush()  # the server has routed all 10 to the service
        await proc.wait_for(r'"msg": "slow request received"')
        proc.signal(signal.SIGTERM)
        replies = await asyncio.gather(*requests)
        assert sorted(int(r.data) for r in replies) == list(range(10))
        assert await proc.wait_exit() == 0
    finally:
        proc.kill()
    logs = [json.loads(line) for line in proc.lines]
    assert all({"ts", "level", "logger", "msg", "service"} <= set(entry) for entry in logs)
    assert all(entry["service"] == "sample" and entry["ts"].endswith("Z") for entry in logs)
    msgs = [entry["msg"] for entry in logs]
    assert "received SIGTERM; shutting down gracefully" in msgs
    assert msgs[-1] == "service stopped"
    assert logs[-1]["clean"] is True
    assert sum(m == "slow request received" for m in msgs) == 10
    # all 10 were received before the shutdown finished
    assert msgs.index("service stopped") > max(
        i for i, m in enumerate(msgs) if m == "slow request received"
    )
