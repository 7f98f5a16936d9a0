"""The guestbus guest agent: runs inside each VM on CPython 3.9+ (stdlib + pyserial-asyncio)."""

__version__ = "0.1.0"
