"""The host adapter tier: real libvirt/QEMU domains, a real nats-server, the serial-bridge
(``pytest -m e2e tests/hv``; root, as tests/e2e). Deselected by default with the rest of the
``e2e`` marker; collecting needs neither libvirt nor the binding."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..e2e import libvirt_harness as harness
from ._support import BIOS, HvStack, TinyVM, remove_stale

if TYPE_CHECKING:
    from tests.conftest import NatsServer


@pytest.fixture(scope="session")
def hv_conn() -> Iterator[Any]:
    """``qemu:///system`` (daemons started if needed); this tier's leftovers removed."""
    conn = harness.connect()
    remove_stale(conn)
    try:
        yield conn
    finally:
        remove_stale(conn)
        conn.close()


@pytest.fixture(scope="session")
def kernel_image() -> Any:
    """The e2e guest image's kernel and initrd (the image is built on first use)."""
    return harness.staged_image(harness.guest_image())


@pytest.fixture
def make_vm(hv_conn: Any) -> Iterator[Callable[..., TinyVM]]:
    """``make_vm(kind=BIOS, pattern=None, start=True, image=None, data_disk=False)``: a
    defined (and started) tiny domain, removed with its snapshots and files after the test."""
    made: list[TinyVM] = []

    def make(
        kind: str = BIOS,
        pattern: int | None = None,
        start: bool = True,
        image: Any = None,
        data_disk: bool = False,
    ) -> TinyVM:
        vm = TinyVM(hv_conn, kind, image, data_disk=data_disk)
        made.append(vm)
        vm.create(pattern)
        if start:
            vm.start()
        return vm

    try:
        yield make
    finally:
        for vm in made:
            vm.remove()


@pytest.fixture
async def stack(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[HvStack]:
    """The bus (a host name of its own, so records of other tests are not its) and a place
    for bridges; the test starts its bridge once its VMs exist."""
    hv = HvStack(nats_server.url, tmp_path)
    await hv.open()
    try:
        yield hv
    finally:
        await hv.close()
