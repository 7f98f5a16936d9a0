"""``guestbus vms``: the fleet as the registry sees it, like the reference tool's VM list."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nats.aio.client import Client

from guestbus.cli.common import add_nats_option, age, registry, run_async, table, with_bus
from guestbus.contract import (
    CAP_SSR,
    CMD_FREEZE,
    CMD_THAW,
    HOST_CAP_RESTORE,
    HOST_CAP_SNAPSHOT,
    VmRecord,
)


def snapshot_support(rec: VmRecord) -> str:
    """``quiesce`` when the host can snapshot the VM and its agent freezes on request,
    ``crash`` when only the host can, ``-`` when the host cannot (no libvirt adapter)."""
    if HOST_CAP_SNAPSHOT not in rec.host_capabilities:
        return "-"
    agent = set(rec.capabilities)
    return "quiesce" if {f"cmd:{CMD_FREEZE}", f"cmd:{CMD_THAW}"} <= agent else "crash"


def restore_support(rec: VmRecord) -> str:
    """Self-service file-level restore needs both the host adapter and the agent's ``ssr``."""
    ok = HOST_CAP_RESTORE in rec.host_capabilities and CAP_SSR in rec.capabilities
    return "yes" if ok else "-"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "vms",
        help="list VMs: agent, link (serial / ip / down) and host, heartbeat, snapshots, restore",
        description=(
            "List the VMs in the registry with their agent and link state. SNAPSHOT: quiesce "
            "(the host snapshots and the agent freezes), crash (host only) or -; RESTORE: yes "
            "when root in the guest can restore files itself (guestbus-agent ssr)."
        ),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    add_nats_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        records = await (await registry(nc)).all()
        if args.json:
            print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
            return 0
        if not records:
            print("no VMs registered yet (agents register when their link comes up)")
            return 0
        rows = [
            (
                r.uuid,
                r.name or "-",
                r.agent_version or "-",
                r.link.value + (f"@{r.host}" if r.host and r.link.value != "down" else ""),
                age(r.last_heartbeat),
                snapshot_support(r),
                restore_support(r),
            )
            for r in records
        ]
        header = ("VM", "NAME", "AGENT", "LINK", "HEARTBEAT", "SNAPSHOT", "RESTORE")
        print(table(header, rows))
        by_link: dict[str, int] = {}
        for r in records:
            by_link[r.link.value] = by_link.get(r.link.value, 0) + 1
        print(
            "\n"
            + ", ".join(f"{n} {k}" for k, n in sorted(by_link.items()))
            + f" ({len(records)} VMs)"
        )
        return 0

    return run_async(with_bus(args, work))
