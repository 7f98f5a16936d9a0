"""serial-bridge: one per hypervisor host; turns VM serial sockets into bus messages."""

__version__ = "0.1.0"
