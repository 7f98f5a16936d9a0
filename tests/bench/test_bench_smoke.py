"""Every benchmark runs in its smoke mode, prints exactly one JSON line with its figures and
then a readable table, and says what its peers did: a benchmark that broke (a renamed
internal it probes, a peer that no longer starts, a figure that went missing) fails here,
not on the day someone needs its figures. Nothing here judges speed: that is what the
benchmarks themselves are for (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_link(r: dict[str, Any]) -> None:
    for ours in ("guest_rpc", "host_ping"):
        seq = r[ours]["sequential"]
        assert seq["errors"] == 0 and seq["n"] > 0 and number(seq["p50_us"]), seq
        assert r[ours]["concurrent"]["errors"] == 0
    for peer in ("uvloop", "uvloop_remote", "asyncio"):
        assert number(r["peers"]["nats"][peer]["sequential"]["p50_us"]), peer
    assert number(r["peers"]["floor"]["sequential"]["p50_us"])
    assert r["peers"]["floor"]["sequential"]["errors"] == 0
    ratios = r["ratios"]["guest_rpc"]
    for key in ("p50_vs_nats", "p50_vs_nats_remote", "p50_vs_floor"):
        assert number(ratios[key]), key
    assert set(r["targets"]) >= {"guest_rpc_p50_vs_nats", "host_ping_p50_vs_nats"}
    assert r["bridge_drops"] == 0


def check_link_hops(r: dict[str, Any]) -> None:
    assert r["calls"] == r["aligned"] == 200  # every call had all its points
    assert len(r["segments"]) == 14
    assert all(number(s["p50_us"]) for s in r["segments"]), r["segments"]
    assert number(r["p50_sum_us"]["crossing"]) and number(r["p50_sum_us"]["code"])


def check_ca(r: dict[str, Any]) -> None:
    assert all(number(v) for v in r["ratios"].values()), r["ratios"]
    assert set(r["bus"]) >= {"sequential", "concurrent", "storm_jitter", "list"}


def check_iso(r: dict[str, Any]) -> None:
    assert r["targets"]["images_valid"]["pass"] is True, r["targets"]
    assert r["targets"]["bus_all_built_stored"]["pass"] is True, r["targets"]
    assert number(r["ratios"]["config-only_p50_vs_genisoimage"])


def check_dr(r: dict[str, Any]) -> None:
    real_netns = os.geteuid() == 0 and shutil.which("ip") is not None
    for part in ("scale", "netns") if real_netns else ("scale",):
        run = r[part]
        assert run["state"] == "succeeded" and run["failed"] == 0, run
        assert run["applied"] == run["vms"]
    if real_netns:
        assert r["netns"]["verified_in_namespaces"] == r["netns"]["vms"]
    else:  # the namespaces need root: the benchmark says it left them out
        assert r["netns"] == {"skipped": "needs root and iproute2"}
    assert r["ping_floor"]["errors"] == 0 and number(r["ratios"]["floor_over_dr"])


BENCHES: list[tuple[str, list[str], str, Callable[[dict[str, Any]], None]]] = [
    ("link.py", ["--quick", "--skip-soak"], "guestbus link benchmark", check_link),
    ("link_hops.py", ["--count", "200", "--warmup", "50"], "where a guest RPC", check_link_hops),
    ("ca.py", ["--quick"], "cert-authority benchmark", check_ca),
    ("iso.py", ["--quick"], "guestbus ISO benchmark", check_iso),
    ("dr.py", ["--quick"], "DR failover benchmark", check_dr),
]


@pytest.mark.parametrize(("script", "args", "title", "check"), BENCHES, ids=[b[0] for b in BENCHES])
def test_benchmark_smoke_run(
    script: str, args: list[str], title: str, check: Callable[[dict[str, Any]], None]
) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    first, _, rest = proc.stdout.partition("\n")
    result = json.loads(first)  # one JSON line first, with every figure
    assert result["bench"] == script.removesuffix(".py")
    assert result["machine"]["cores"] >= 1 and result["date"]
    assert title in rest and not rest.lstrip().startswith("{")  # then the readable table
    assert "Traceback" not in proc.stderr
    check(result)
