"""The VM registry under the load the link puts on it: many VMs changing at once, and one VM
sending a burst of RPCs that all change its entry."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from guestbus.contract import VmRecord
from guestbus.registry import Registry

from ._support import LinkStack, StackFactory, random_vm

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def registry(make_stack: StackFactory) -> Registry:
    stack: LinkStack = await make_stack(bridge_mode="inprocess")
    return stack.registry


def rename(host: str) -> Callable[[VmRecord], VmRecord]:
    return lambda rec: rec.model_copy(update={"hostname": host})


def append_capability(tag: str) -> Callable[[VmRecord], VmRecord]:
    return lambda rec: rec.model_copy(update={"capabilities": [*rec.capabilities, tag]})


async def test_snapshot_lists_each_vm_once_while_entries_change(registry: Registry) -> None:
    vms = [random_vm() for _ in range(100)]
    for vm in vms:
        await registry.change(vm, rename("h0"))
    stop = asyncio.Event()

    async def churn(seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not stop.is_set():
            n += 1
            await registry.change(rng.choice(vms), rename(f"h{seed}-{n}"))

    churners = [asyncio.ensure_future(churn(i)) for i in range(8)]
    try:
        for _ in range(20):
            listed = [r.uuid for r in await registry.all() if r.uuid in set(vms)]
            assert len(listed) == len(set(listed)), "a VM listed twice"
            assert set(listed) == set(vms), f"{len(set(vms) - set(listed))} VMs missing"
    finally:
        stop.set()
        await asyncio.gather(*churners)


async def test_a_burst_of_changes_to_one_vm_all_apply(registry: Registry) -> None:
    """What rpc-router's concurrent heartbeat handlers do when one VM sends a burst."""
    vm = random_vm()
    await asyncio.gather(*(registry.change(vm, append_capability(f"c{i}")) for i in range(64)))
    rec, _ = await registry.get(vm)
    assert rec is not None
    assert sorted(rec.capabilities) == sorted(f"c{i}" for i in range(64))
