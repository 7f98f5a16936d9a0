"""A VM's name comes from its libvirt domain XML: the bridge records it in the registry and
stamps it on every guest RPC (``GB-VM-Name``, next to ``GB-VM``), and a domain renamed on
the host is renamed in both, without the link going down."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from guestbus.contract import HEADER_VM, HEADER_VM_NAME, RPC_HEARTBEAT, rpc_subject

from ..support.waiting import wait_until
from ._support import SOCKET_NAME, LinkStack, StackFactory, random_vm

pytestmark = pytest.mark.timeout(60)


def write_domain(xml_dir: Path, uuid: str, name: str, socket: Path) -> None:
    tmp = xml_dir / f".{uuid}.tmp"
    tmp.write_text(
        f"""<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>
          <serial type='unix'><source mode='bind' path='{socket}'/>
            <target type='isa-serial' port='1'/></serial>
        </devices></domain>"""
    )
    tmp.rename(xml_dir / f"{uuid}.xml")  # libvirt replaces its files whole, too


async def test_domain_name_is_stamped_and_follows_a_rename(make_stack: StackFactory) -> None:
    xml_dir = Path(tempfile.mkdtemp(prefix="gbxml-"))
    stack: LinkStack = await make_stack(
        bridge_mode="inprocess",
        heartbeat=0.3,
        bridge_config={"xml_dirs": (xml_dir,), "scan_interval": 0.2},
    )
    assert stack.nc is not None
    uuid = random_vm()
    names: list[str | None] = []  # GB-VM-Name of this VM's heartbeats, as rpc-router sees them

    async def on_beat(msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get(HEADER_VM) == uuid:
            names.append(headers.get(HEADER_VM_NAME))

    # not in rpc-router's queue group: a copy of every heartbeat
    sub = await stack.nc.subscribe(rpc_subject(RPC_HEARTBEAT), cb=on_beat)
    try:
        socket = stack.sockets / SOCKET_NAME.format(uuid=uuid)
        write_domain(xml_dir, uuid, "web-1", socket)
        await stack.fleet.add_vm(uuid)
        await stack.wait_active([uuid])
        assert (await stack.wait_registered([uuid]))[uuid].name == "web-1"
        await wait_until(lambda: len(names) >= 2, 10, "two heartbeats")
        assert set(names) == {"web-1"}

        mark = stack.events.mark()
        write_domain(xml_dir, uuid, "web-2", socket)
        await wait_until(lambda: names[-3:] == ["web-2"] * 3, 15, "heartbeats stamped web-2")

        async def renamed() -> bool:
            return (await stack.records())[uuid].name == "web-2"

        await wait_until(renamed, 15, "the new domain name in the registry")
        assert stack.events.link_events(uuid, mark) == [], "a rename must not take the link down"
    finally:
        await sub.unsubscribe()
