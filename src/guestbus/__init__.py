"""guestbus: guest-tools control plane for KVM/libvirt.

This package's top level must stay importable on CPython 3.9 with the standard library
only: the guest agent carries ``guestbus.wire`` into guests.
"""

__version__ = "0.1.0"
