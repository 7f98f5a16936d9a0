"""guestbus lab: fake hypervisors for tests and benchmarks.

:mod:`guestbus.lab.hypervisor` emulates QEMU's ``<serial type='unix'>`` sockets (bind mode) for
many VMs in one process, each relayed to a guest-side device (a raw pty or a socketpair).
Run ``python -m guestbus.lab.hypervisor --help``.

Names are re-exported lazily so that ``python -m guestbus.lab.hypervisor`` does not import the
module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guestbus.lab.guest import PtyExhaustedError
    from guestbus.lab.hypervisor import LabHypervisor, LabMode, LabVM, VMHook
    from guestbus.lab.relay import RelayStats

__all__ = ["LabHypervisor", "LabMode", "LabVM", "PtyExhaustedError", "RelayStats", "VMHook"]

_WHERE = {
    "LabHypervisor": "guestbus.lab.hypervisor",
    "LabMode": "guestbus.lab.hypervisor",
    "LabVM": "guestbus.lab.hypervisor",
    "VMHook": "guestbus.lab.hypervisor",
    "PtyExhaustedError": "guestbus.lab.guest",
    "RelayStats": "guestbus.lab.relay",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
