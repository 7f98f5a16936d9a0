"""``guestbus dr …`` as an operator runs it, against the real services and agents."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from ._support import DrStack

PLAN = """\
# the recovery site
name: {name}
mappings:                      # ordered; first match wins; the host part is kept
  - {{source: 10.0.0.0/16, target: 10.9.0.0/16, gateway: 10.9.0.1, dns: [10.9.0.53]}}
test_mappings:
  - {{source: 10.0.0.0/16, target: 192.168.0.0/16, gateway: 192.168.0.1}}
vms:
  - {{vm: {first}, addresses: [10.9.0.200/16]}}
groups: [[{first}], [{second}]]
timeouts: {{link: 20, apply: 10, script: 30, gateway: 2}}
"""


async def cli(
    stack: DrStack, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GUESTBUS_NATS_URL=stack.url)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "guestbus.cli.main", "dr", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=120,
    )


async def test_plan_apply_show_and_clear_errors(stack: DrStack, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.format(name="cli-plan", first="web-1", second="db-1"))
    done = await cli(stack, "plan", "apply", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("plan cli-plan created (revision ")
    assert "not in the VM registry yet: web-1, db-1" in done.stderr
    shown = await cli(stack, "plan", "show", "cli-plan")
    assert shown.returncode == 0 and "target: 10.9.0.0/16" in shown.stdout
    assert "- vm: web-1" in shown.stdout and shown.stdout.startswith("# plan cli-plan, revision")
    listed = await cli(stack, "plan", "ls")
    assert "cli-plan" in listed.stdout

    path.write_text("name: x\nmappings: [\n")
    bad_yaml = await cli(stack, "plan", "apply", str(path))
    assert (
        bad_yaml.returncode == 1
        and "line 3" in bad_yaml.stderr
        and "not valid YAML" in bad_yaml.stderr
    )
    path.write_text(
        PLAN.format(name="bad", first="a", second="a").replace("10.9.0.1,", "10.8.0.1,")
    )
    invalid = await cli(stack, "plan", "apply", str(path))
    assert invalid.returncode == 1
    line = invalid.stderr.strip()
    assert "\n" not in line and line.startswith("error: plan bad has 2 problems: ")
    assert "mappings[0].gateway: 10.8.0.1 is not inside the target 10.9.0.0/16" in line
    assert "VM 'a' is already in groups[0]" in line and "(invalid_plan)" in line
    for result in (bad_yaml, invalid):
        assert "Traceback" not in result.stderr
    missing = await cli(stack, "status", "no-such-run")
    assert (
        missing.returncode == 1
        and missing.stderr.strip() == "error: no DR run 'no-such-run' (see `guestbus dr runs`)"
    )


async def test_failover_live_table_status_and_report(stack: DrStack, tmp_path: Path) -> None:
    web, db = await stack.fleet.add_vms(2)
    await stack.link.wait_registered([web.uuid, db.uuid])
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.format(name="cli-run", first=web.uuid, second=db.uuid))
    assert (await cli(stack, "plan", "apply", str(path))).returncode == 0

    refused = await cli(stack, "failover", "cli-run")
    assert refused.returncode == 1 and "pass --yes" in refused.stderr

    done = await cli(stack, "failover", "cli-run", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{web.uuid[:8]}  waiting-for-link" in done.stdout  # a line per change (no tty)
    assert f"{web.uuid[:8]}  applied: 10.9.0.200/16" in done.stdout
    assert "succeeded; 2/2 VMs finished: 2 applied" in done.stdout
    run = done.stderr.split("run ", 1)[1].split()[0]

    status = await cli(stack, "status", run[:12], "--json")
    assert status.returncode == 0
    data = json.loads(status.stdout)
    assert data["run"]["state"] == "succeeded" and len(data["vms"]) == 2
    report = await cli(stack, "report", run)
    assert report.returncode == 0
    text = report.stdout
    assert f"DR run {run}: failover of plan cli-run" in text
    assert "group 0" in text and "group 1" in text
    assert "→ 10.9.0.200/16, gateway 10.9.0.1" in text
    assert "dns 10.9.0.53" in text

    runs = await cli(stack, "runs", "--plan", "cli-run")
    assert run in runs.stdout and "succeeded" in runs.stdout
