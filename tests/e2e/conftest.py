"""The e2e tier: real libvirt/QEMU guests (``pytest -m e2e tests/e2e``; needs root, see
e2e/README.md). Deselected by default (``addopts = -m 'not e2e'``); collecting these modules
needs neither libvirt nor the binding, so the ordinary suite is unaffected."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import libvirt_harness as harness


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[object]:
    """``qemu:///system``, daemons started if needed; leftovers of an interrupted run
    (``gbe2e-*`` domains) removed first."""
    conn = harness.connect()
    harness.cleanup_stale(conn)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def guest_image() -> harness.GuestImage:
    """The cached guest image (the first run builds it: about 2 minutes)."""
    return harness.staged_image(harness.guest_image())
