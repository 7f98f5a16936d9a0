"""rpc-router: guest-initiated RPCs (hello, heartbeat, report) and the VM registry."""

__version__ = "0.1.0"
